-- Lease expiry is decided from the database, not from one replica's view of it: every coordinator
-- replica records when it last reached the database and when it last had trouble with it, and every
-- lease records which replica last renewed it. A replica expires another replica's lease only when that
-- replica has reached the database since the lease ran out (it could have renewed, so the agent is
-- silent) and has been healthy for a lease timeout, or when it has been gone for three lease timeouts.
CREATE TABLE replicas (
    id         TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL,
    trouble_at BIGINT NOT NULL DEFAULT 0
);
ALTER TABLE tasks ADD COLUMN renewed_by TEXT NOT NULL DEFAULT '';
