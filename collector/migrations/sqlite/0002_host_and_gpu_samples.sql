
ALTER TABLE nodes ADD COLUMN gpu_state TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN gpu_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_util_percent REAL NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_used_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_total_bytes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE host_samples (
    node               TEXT NOT NULL,
    observed_ms        INTEGER NOT NULL,
    cpu_percent        REAL NOT NULL,
    load_1             REAL NOT NULL,
    memory_used_bytes  INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    swap_used_bytes    INTEGER NOT NULL,
    process_count      INTEGER NOT NULL,
    PRIMARY KEY (node, observed_ms)
) WITHOUT ROWID;
CREATE INDEX host_samples_by_time ON host_samples (observed_ms);
CREATE TABLE gpu_samples (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    observed_ms          INTEGER NOT NULL,
    gpu_index            INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    utilization_percent  INTEGER NOT NULL,
    memory_util_percent  INTEGER NOT NULL,
    memory_used_bytes    INTEGER NOT NULL,
    memory_total_bytes   INTEGER NOT NULL,
    power_milliwatts     INTEGER NOT NULL,
    temperature_celsius  INTEGER NOT NULL,
    error                TEXT NOT NULL,
    PRIMARY KEY (node, gpu_uuid, observed_ms)
) WITHOUT ROWID;
CREATE INDEX gpu_samples_by_time ON gpu_samples (observed_ms);
CREATE TABLE gpu_usage (
    node         TEXT NOT NULL,
    observed_ms  INTEGER NOT NULL,
    gpu_uuid     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    process_name TEXT NOT NULL,
    exe          TEXT NOT NULL,
    container_id TEXT NOT NULL,
    gpu_seconds  REAL NOT NULL,
    used_memory_bytes INTEGER NOT NULL,
    PRIMARY KEY (node, observed_ms, gpu_uuid, pid)
) WITHOUT ROWID;
CREATE INDEX gpu_usage_by_time ON gpu_usage (observed_ms);
