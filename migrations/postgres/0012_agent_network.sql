-- Agents of protocol 6 measure their network paths (round-trip time and throughput to the coordinator
-- and to operator-named probe targets) between tasks and report them; the latest report, as JSON (a
-- list of paths). NULL for agents that never reported one.
ALTER TABLE agents ADD COLUMN network_json TEXT;
