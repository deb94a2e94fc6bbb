-- Runs are looked up by id from heartbeats (lease extension), results and releases.
CREATE INDEX tasks_run ON tasks (run_id);
