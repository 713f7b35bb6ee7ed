
CREATE TABLE flows_minute (
    node           TEXT NOT NULL,
    minute_ms      INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    process        TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    direction      TEXT NOT NULL,
    remote_address TEXT NOT NULL,
    remote_port    INTEGER NOT NULL,
    country        TEXT NOT NULL,
    asn            INTEGER NOT NULL,
    org            TEXT NOT NULL,
    geo_source     TEXT NOT NULL,
    bytes_sent     INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    connections    INTEGER NOT NULL,
    min_rtt_us     INTEGER NOT NULL,
    PRIMARY KEY (node, minute_ms, pid, protocol, direction, remote_address, remote_port)
) WITHOUT ROWID;
CREATE INDEX flows_minute_by_time ON flows_minute (minute_ms);
CREATE TABLE flows_raw (
    node           TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    epoch          INTEGER NOT NULL,
    idx            INTEGER NOT NULL,
    start_ms       INTEGER NOT NULL,
    end_ms         INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    process        TEXT NOT NULL,
    country        TEXT NOT NULL,
    asn            INTEGER NOT NULL,
    flow           BLOB NOT NULL,
    PRIMARY KEY (node, epoch, seq, idx)
) WITHOUT ROWID;
CREATE INDEX flows_raw_by_time ON flows_raw (end_ms);
