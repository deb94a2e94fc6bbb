-- The pooling key of a run: everything that changes the work and how it ran (coordinator/src/pooling.rs).
-- Runs stored before it existed lack some of its parts; they are marked so that they pool only with each
-- other, under their old configuration label, and rankings say so.
ALTER TABLE runs ADD COLUMN pool_key TEXT NOT NULL DEFAULT '';
UPDATE runs SET pool_key = 'legacy:' || config_key;
