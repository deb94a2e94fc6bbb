-- Generate runs (decoder models) send token figures with every telemetry window: histograms of time to
-- first token, time per output token and inter-token latency, and prompt, output and good-request
-- counts, as JSON (histograms hex-encoded). NULL for the windows of every other scenario.
ALTER TABLE windows ADD COLUMN generation_json TEXT;
