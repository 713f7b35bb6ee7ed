
ALTER TABLE nodes ADD COLUMN gpu_state TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN gpu_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_util_percent DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_used_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_total_bytes BIGINT NOT NULL DEFAULT 0;
CREATE TABLE host_samples (
    node               TEXT NOT NULL,
    observed_ms        BIGINT NOT NULL,
    cpu_percent        DOUBLE PRECISION NOT NULL,
    load_1             DOUBLE PRECISION NOT NULL,
    memory_used_bytes  BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL,
    swap_used_bytes    BIGINT NOT NULL,
    process_count      BIGINT NOT NULL,
    PRIMARY KEY (node, observed_ms)
);
CREATE INDEX host_samples_by_time ON host_samples (observed_ms);
CREATE TABLE gpu_samples (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    observed_ms          BIGINT NOT NULL,
    gpu_index            BIGINT NOT NULL,
    name                 TEXT NOT NULL,
    utilization_percent  BIGINT NOT NULL,
    memory_util_percent  BIGINT NOT NULL,
    memory_used_bytes    BIGINT NOT NULL,
    memory_total_bytes   BIGINT NOT NULL,
    power_milliwatts     BIGINT NOT NULL,
    temperature_celsius  BIGINT NOT NULL,
    error                TEXT NOT NULL,
    PRIMARY KEY (node, gpu_uuid, observed_ms)
);
CREATE INDEX gpu_samples_by_time ON gpu_samples (observed_ms);
CREATE TABLE gpu_usage (
    node              TEXT NOT NULL,
    observed_ms       BIGINT NOT NULL,
    gpu_uuid          TEXT NOT NULL,
    pid               BIGINT NOT NULL,
    process_name      TEXT NOT NULL,
    exe               TEXT NOT NULL,
    container_id      TEXT NOT NULL,
    gpu_seconds       DOUBLE PRECISION NOT NULL,
    used_memory_bytes BIGINT NOT NULL,
    PRIMARY KEY (node, observed_ms, gpu_uuid, pid)
);
CREATE INDEX gpu_usage_by_time ON gpu_usage (observed_ms);
