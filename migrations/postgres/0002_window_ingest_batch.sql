-- Each ingest batch tags the windows it stores, so that duplicates (resends after a reconnect) are
-- told apart without RETURNING every row.
ALTER TABLE windows ADD COLUMN ingest_batch BIGINT NOT NULL DEFAULT 0;
