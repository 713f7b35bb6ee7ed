
CREATE TABLE breaches (
    breach_id    TEXT PRIMARY KEY,
    rule         TEXT NOT NULL,
    node         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    severity     TEXT NOT NULL,
    state        TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    opened_ms    INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    resolved_ms  INTEGER,
    obs_count    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX breaches_open_key ON breaches (rule, node, subject) WHERE state = 'open';
CREATE INDEX breaches_by_rule ON breaches (rule, state, last_seen_ms);
CREATE INDEX breaches_by_opened ON breaches (opened_ms);
CREATE TABLE breach_log (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    breach_id TEXT NOT NULL,
    event     TEXT NOT NULL,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER breach_log_no_update BEFORE UPDATE ON breach_log
BEGIN SELECT RAISE(ABORT, 'breach_log is append-only'); END;
CREATE TRIGGER breach_log_no_delete BEFORE DELETE ON breach_log
BEGIN SELECT RAISE(ABORT, 'breach_log is append-only'); END;
