
CREATE TABLE nodes (
    node               TEXT PRIMARY KEY,
    site               TEXT NOT NULL,
    country            TEXT NOT NULL,
    hostname           TEXT NOT NULL,
    agent_version      TEXT NOT NULL,
    labels             TEXT NOT NULL,
    first_seen_ms      BIGINT NOT NULL,
    last_seen_ms       BIGINT NOT NULL,
    last_observed_ms   BIGINT NOT NULL,
    latest_epoch       BIGINT NOT NULL,
    cpu_percent        DOUBLE PRECISION NOT NULL,
    memory_used_bytes  BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL
);
CREATE TABLE node_epochs (
    node          TEXT NOT NULL,
    epoch         BIGINT NOT NULL,
    reports       BIGINT NOT NULL,
    last_seq      BIGINT NOT NULL,
    conflicts     BIGINT NOT NULL DEFAULT 0,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (node, epoch)
);
CREATE TABLE reports (
    node        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    observed_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    body        BYTEA NOT NULL,
    PRIMARY KEY (node, epoch, seq)
);
CREATE TABLE gaps (
    node        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    first_seq   BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    dropped_ms  BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (node, epoch, first_seq, last_seq)
);
