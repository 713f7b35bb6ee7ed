
CREATE TABLE flows_minute (
    node           TEXT NOT NULL,
    minute_ms      BIGINT NOT NULL,
    pid            BIGINT NOT NULL,
    process        TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    direction      TEXT NOT NULL,
    remote_address TEXT NOT NULL,
    remote_port    BIGINT NOT NULL,
    country        TEXT NOT NULL,
    asn            BIGINT NOT NULL,
    org            TEXT NOT NULL,
    geo_source     TEXT NOT NULL,
    bytes_sent     BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    connections    BIGINT NOT NULL,
    min_rtt_us     BIGINT NOT NULL,
    PRIMARY KEY (node, minute_ms, pid, protocol, direction, remote_address, remote_port)
);
CREATE INDEX flows_minute_by_time ON flows_minute (minute_ms);
CREATE TABLE flows_raw (
    node     TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    epoch    BIGINT NOT NULL,
    idx      BIGINT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms   BIGINT NOT NULL,
    pid      BIGINT NOT NULL,
    process  TEXT NOT NULL,
    country  TEXT NOT NULL,
    asn      BIGINT NOT NULL,
    flow     BYTEA NOT NULL,
    PRIMARY KEY (node, epoch, seq, idx)
);
CREATE INDEX flows_raw_by_time ON flows_raw (end_ms);
