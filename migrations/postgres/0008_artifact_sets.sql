-- Large models. A blob's bytes live where `location` says: 'db' (chunks in blob_chunks, as before, and
-- always on Postgres, so replicas share them) or 'file' (a content-addressed file under the data
-- directory: SQLite keeps only metadata in the database). Inline blobs of older SQLite databases are
-- moved out to files by the coordinator after this migration (store/sql/blobs.rs), in batches.
ALTER TABLE blobs ADD COLUMN location TEXT NOT NULL DEFAULT 'db';

-- An artifact set: a model and the external-data files its initializers reference
-- (common/src/artifact.rs). A variant's artifact_sha256 names a set; the set's manifest is itself a blob
-- under that sha256 (for a single file, the file is), so variants keep referencing blobs.
CREATE TABLE artifact_sets (
    sha256      TEXT PRIMARY KEY,
    model_path  TEXT   NOT NULL,
    total_bytes BIGINT NOT NULL,
    file_count  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE artifact_files (
    set_sha256 TEXT   NOT NULL,
    path       TEXT   NOT NULL,
    sha256     TEXT   NOT NULL,
    size_bytes BIGINT NOT NULL,
    PRIMARY KEY (set_sha256, path)
);
CREATE INDEX artifact_files_blob ON artifact_files (sha256);

-- Every artifact stored before sets existed is a set of one file.
INSERT INTO artifact_sets (sha256, model_path, total_bytes, file_count, created_at)
    SELECT b.sha256, 'model.onnx', b.size_bytes, 1, b.created_at FROM blobs b
    WHERE b.sha256 IN (SELECT artifact_sha256 FROM model_variants);
INSERT INTO artifact_files (set_sha256, path, sha256, size_bytes)
    SELECT sha256, 'model.onnx', sha256, total_bytes FROM artifact_sets;

-- Uploads in progress, resumable: one per (client, set). Staged bytes live beside the blobs (files
-- under the data directory, or chunks in blob_chunks under a key that is not a sha256).
CREATE TABLE uploads (
    id            TEXT PRIMARY KEY,
    owner         TEXT   NOT NULL,
    set_sha256    TEXT   NOT NULL,
    manifest_json TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

-- Background work that one replica at a time does (window retention, upload expiry): who holds it
-- until when.
CREATE TABLE maintenance (
    name     TEXT PRIMARY KEY,
    holder   TEXT   NOT NULL,
    until_ms BIGINT NOT NULL
);

-- Retention looks windows up by run.
CREATE INDEX runs_finished ON runs (state, finished_at);

-- Facts about this database, e.g. its id, which marks the data directory that holds its blob files.
CREATE TABLE store_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
