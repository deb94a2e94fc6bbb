-- Stored forms the coordinator owns. Up to 0003, variants, inventories, job specs, task configurations,
-- run summaries and windows were protobuf bytes; these columns hold JSON of the coordinator's domain
-- types, and windows get plain columns. The coordinator converts the old rows after this migration
-- (store/sql/migrate.rs), then 0005 drops the protobuf columns.
ALTER TABLE model_variants ADD COLUMN info_json TEXT;
ALTER TABLE platforms ADD COLUMN descriptor_json TEXT;
ALTER TABLE agents ADD COLUMN inventory_json TEXT;
ALTER TABLE jobs ADD COLUMN spec_json TEXT;
ALTER TABLE tasks ADD COLUMN config_json TEXT;
ALTER TABLE runs ADD COLUMN summary_json TEXT;
ALTER TABLE windows ADD COLUMN start_offset_ns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE windows ADD COLUMN histogram BYTEA;
ALTER TABLE windows ADD COLUMN issue_delay_histogram BYTEA;
ALTER TABLE windows ADD COLUMN resources_json TEXT;
ALTER TABLE windows ADD COLUMN late_queries BIGINT NOT NULL DEFAULT 0;
ALTER TABLE windows ADD COLUMN dropped_queries BIGINT NOT NULL DEFAULT 0;
ALTER TABLE windows ADD COLUMN closed_at BIGINT NOT NULL DEFAULT 0;
