
CREATE TABLE host_minute (
    node               TEXT NOT NULL,
    minute_ms          INTEGER NOT NULL,
    samples            INTEGER NOT NULL,
    cpu_percent_avg    REAL NOT NULL,
    cpu_percent_max    REAL NOT NULL,
    load_1_max         REAL NOT NULL,
    memory_used_avg    REAL NOT NULL,
    memory_used_max    INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    PRIMARY KEY (node, minute_ms)
) WITHOUT ROWID;
CREATE INDEX host_minute_by_time ON host_minute (minute_ms);
CREATE TABLE gpu_minute (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    minute_ms            INTEGER NOT NULL,
    samples              INTEGER NOT NULL,
    utilization_avg      REAL NOT NULL,
    utilization_max      INTEGER NOT NULL,
    memory_used_max      INTEGER NOT NULL,
    memory_total_bytes   INTEGER NOT NULL,
    power_avg_milliwatts REAL NOT NULL,
    PRIMARY KEY (node, gpu_uuid, minute_ms)
) WITHOUT ROWID;
CREATE INDEX gpu_minute_by_time ON gpu_minute (minute_ms);
CREATE TABLE gpu_usage_minute (
    node            TEXT NOT NULL,
    minute_ms       INTEGER NOT NULL,
    gpu_uuid        TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    process_name    TEXT NOT NULL,
    gpu_seconds     REAL NOT NULL,
    used_memory_max INTEGER NOT NULL,
    PRIMARY KEY (node, minute_ms, gpu_uuid, pid)
) WITHOUT ROWID;
CREATE INDEX gpu_usage_minute_by_time ON gpu_usage_minute (minute_ms);
