-- API tokens (viewer, submitter, admin), agent join tokens (agent-join) and agents' credentials
-- (agent, bound to agent_id), in one table shared by every replica. Only the SHA-256 of each secret
-- is stored. 0 in expires_at, revoked_at and last_used_at means never; uses_left -1 means no limit.
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    agent_id      TEXT NOT NULL DEFAULT '',
    uses_left     BIGINT NOT NULL DEFAULT -1,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL DEFAULT 0,
    revoked_at    BIGINT NOT NULL DEFAULT 0,
    last_used_at  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX tokens_agent ON tokens (agent_id);
