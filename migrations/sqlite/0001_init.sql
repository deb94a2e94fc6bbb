-- fleetbench schema, SQLite flavour. Keep in step with migrations/postgres/0001_init.sql (same tables and
-- columns; only types differ). Times are Unix milliseconds; booleans are 0/1 integers.

CREATE TABLE blobs (
    sha256      TEXT PRIMARY KEY,
    size_bytes  BIGINT NOT NULL,
    chunk_count BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE blob_chunks (
    sha256 TEXT   NOT NULL,
    idx    BIGINT NOT NULL,
    data   BLOB   NOT NULL,
    PRIMARY KEY (sha256, idx)
);

CREATE TABLE model_variants (
    model              TEXT   NOT NULL,
    variant            TEXT   NOT NULL,
    artifact_sha256    TEXT   NOT NULL REFERENCES blobs (sha256),
    size_bytes         BIGINT NOT NULL,
    variant_of         TEXT   NOT NULL DEFAULT '',
    technique          TEXT   NOT NULL DEFAULT '',
    recipe_json        TEXT   NOT NULL DEFAULT '',
    eval_inputs_sha256 TEXT   NOT NULL DEFAULT '',
    eval_labels_sha256 TEXT   NOT NULL DEFAULT '',
    info               BLOB   NOT NULL,
    created_at         BIGINT NOT NULL,
    PRIMARY KEY (model, variant)
);

CREATE TABLE platforms (
    id         TEXT PRIMARY KEY,
    name       TEXT   NOT NULL,
    descriptor BLOB   NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    name         TEXT   NOT NULL UNIQUE,
    platform_id  TEXT   NOT NULL REFERENCES platforms (id),
    host_id      TEXT   NOT NULL,
    labels_json  TEXT   NOT NULL,
    inventory    BLOB   NOT NULL,
    connected    BIGINT NOT NULL DEFAULT 0,
    registered_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
CREATE INDEX agents_host ON agents (host_id);

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    model       TEXT   NOT NULL,
    name        TEXT   NOT NULL DEFAULT '',
    spec        BLOB   NOT NULL,
    state       TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    job_id           TEXT   NOT NULL REFERENCES jobs (id),
    seq              BIGINT NOT NULL,
    model            TEXT   NOT NULL,
    variant          TEXT   NOT NULL,
    platform_id      TEXT   NOT NULL,
    host_id          TEXT   NOT NULL,
    target_agent_id  TEXT   NOT NULL,
    config           BLOB   NOT NULL,
    state            TEXT   NOT NULL,
    attempt          BIGINT NOT NULL DEFAULT 0,
    agent_id         TEXT   NOT NULL DEFAULT '',
    run_id           TEXT   NOT NULL DEFAULT '',
    lease_expires_at BIGINT NOT NULL DEFAULT 0,
    error            TEXT   NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL,
    finished_at      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX tasks_job ON tasks (job_id, seq);
CREATE INDEX tasks_pending ON tasks (state, platform_id);
CREATE INDEX tasks_agent ON tasks (agent_id, state);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    task_id          TEXT   NOT NULL REFERENCES tasks (id),
    job_id           TEXT   NOT NULL,
    agent_id         TEXT   NOT NULL,
    platform_id      TEXT   NOT NULL,
    model            TEXT   NOT NULL,
    variant          TEXT   NOT NULL,
    attempt          BIGINT NOT NULL,
    state            TEXT   NOT NULL,
    progress_queries BIGINT NOT NULL DEFAULT 0,
    windows          BIGINT NOT NULL DEFAULT 0,
    valid            BIGINT NOT NULL DEFAULT 0,
    config_key       TEXT   NOT NULL DEFAULT '',
    summary          BLOB,
    histogram        BLOB,
    error            TEXT   NOT NULL DEFAULT '',
    started_at       BIGINT NOT NULL,
    finished_at      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX runs_model ON runs (model, state);
CREATE INDEX runs_task ON runs (task_id);

CREATE TABLE windows (
    run_id        TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    queries       BIGINT NOT NULL,
    samples       BIGINT NOT NULL,
    end_offset_ns BIGINT NOT NULL,
    body          BLOB   NOT NULL,
    stored_at     BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
