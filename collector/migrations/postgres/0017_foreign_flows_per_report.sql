-- Issue 14: the raw flows to destinations outside the node's country are kept one row per
-- report (its foreign flows as one protobuf message), no longer one row per flow: a 50-flow
-- report wrote 50 rows (and 50 index entries) that nothing reads by flow, and those rows were
-- most of what derivation cost. Each flow's place at the time (country, ASN, verdict) is in
-- its `flows_minute` row, whose key (node, minute, pid, protocol, direction, address, port)
-- every raw flow has. `flows_raw` keeps the rows written before this migration until
-- retention prunes them; nothing new goes there.
CREATE TABLE foreign_flows (
    node       TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    start_ms   BIGINT NOT NULL,
    end_ms     BIGINT NOT NULL,
    flow_count BIGINT NOT NULL,
    countries  TEXT NOT NULL,
    flows      BYTEA NOT NULL,
    PRIMARY KEY (node, epoch, seq)
);
CREATE INDEX foreign_flows_by_time ON foreign_flows (end_ms);
