
CREATE TABLE host_minute (
    node               TEXT NOT NULL,
    minute_ms          BIGINT NOT NULL,
    samples            BIGINT NOT NULL,
    cpu_percent_avg    DOUBLE PRECISION NOT NULL,
    cpu_percent_max    DOUBLE PRECISION NOT NULL,
    load_1_max         DOUBLE PRECISION NOT NULL,
    memory_used_avg    DOUBLE PRECISION NOT NULL,
    memory_used_max    BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL,
    PRIMARY KEY (node, minute_ms)
);
CREATE INDEX host_minute_by_time ON host_minute (minute_ms);
CREATE TABLE gpu_minute (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    minute_ms            BIGINT NOT NULL,
    samples              BIGINT NOT NULL,
    utilization_avg      DOUBLE PRECISION NOT NULL,
    utilization_max      BIGINT NOT NULL,
    memory_used_max      BIGINT NOT NULL,
    memory_total_bytes   BIGINT NOT NULL,
    power_avg_milliwatts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node, gpu_uuid, minute_ms)
);
CREATE INDEX gpu_minute_by_time ON gpu_minute (minute_ms);
CREATE TABLE gpu_usage_minute (
    node            TEXT NOT NULL,
    minute_ms       BIGINT NOT NULL,
    gpu_uuid        TEXT NOT NULL,
    pid             BIGINT NOT NULL,
    process_name    TEXT NOT NULL,
    gpu_seconds     DOUBLE PRECISION NOT NULL,
    used_memory_max BIGINT NOT NULL,
    PRIMARY KEY (node, minute_ms, gpu_uuid, pid)
);
CREATE INDEX gpu_usage_minute_by_time ON gpu_usage_minute (minute_ms);
