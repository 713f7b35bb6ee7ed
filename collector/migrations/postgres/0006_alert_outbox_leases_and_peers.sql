
CREATE TABLE alert_outbox (
    sink            TEXT NOT NULL,
    log_seq         BIGINT NOT NULL,
    breach_id       TEXT NOT NULL,
    event           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    last_error      TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    settled_ms      BIGINT,
    PRIMARY KEY (sink, log_seq)
);
CREATE INDEX alert_outbox_pending ON alert_outbox (sink, state, log_seq);
CREATE TABLE alert_cursor (
    sink      TEXT PRIMARY KEY,
    after_seq BIGINT NOT NULL
);
CREATE TABLE leases (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
CREATE TABLE node_peers (
    node    TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    country TEXT NOT NULL,
    asn     BIGINT NOT NULL,
    source  TEXT NOT NULL,
    seen_ms BIGINT NOT NULL
);
