
CREATE TABLE breaches (
    breach_id    TEXT PRIMARY KEY,
    rule         TEXT NOT NULL,
    node         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    severity     TEXT NOT NULL,
    state        TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    opened_ms    BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    resolved_ms  BIGINT,
    obs_count    BIGINT NOT NULL
);
CREATE UNIQUE INDEX breaches_open_key ON breaches (rule, node, subject) WHERE state = 'open';
CREATE INDEX breaches_by_rule ON breaches (rule, state, last_seen_ms);
CREATE INDEX breaches_by_opened ON breaches (opened_ms);
CREATE TABLE breach_log (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    breach_id TEXT NOT NULL,
    event     TEXT NOT NULL,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE FUNCTION breach_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'breach_log is append-only';
END
$$;
CREATE TRIGGER breach_log_no_change BEFORE UPDATE OR DELETE ON breach_log
    FOR EACH ROW EXECUTE FUNCTION breach_log_append_only();
CREATE TRIGGER breach_log_no_truncate BEFORE TRUNCATE ON breach_log
    FOR EACH STATEMENT EXECUTE FUNCTION breach_log_append_only();
