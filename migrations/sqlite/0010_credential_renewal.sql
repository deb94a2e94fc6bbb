-- Agent credentials renew before they expire: the coordinator offers a new secret when an agent
-- registers in the second half of its credential's validity, and the old secret keeps working until
-- the agent first uses the new one (so an answer lost on the way costs nothing).
ALTER TABLE tokens ADD COLUMN next_secret_sha256 TEXT NOT NULL DEFAULT '';
