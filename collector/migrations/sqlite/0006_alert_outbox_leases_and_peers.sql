
CREATE TABLE alert_outbox (
    sink            TEXT NOT NULL,
    log_seq         INTEGER NOT NULL,
    breach_id       TEXT NOT NULL,
    event           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    last_error      TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    settled_ms      INTEGER,
    PRIMARY KEY (sink, log_seq)
) WITHOUT ROWID;
CREATE INDEX alert_outbox_pending ON alert_outbox (sink, state, log_seq);
CREATE TABLE alert_cursor (
    sink      TEXT PRIMARY KEY,
    after_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE leases (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE node_peers (
    node    TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    country TEXT NOT NULL,
    asn     INTEGER NOT NULL,
    source  TEXT NOT NULL,
    seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
