
CREATE TABLE IF NOT EXISTS nodes (
    node               TEXT PRIMARY KEY,
    site               TEXT NOT NULL,
    country            TEXT NOT NULL,
    hostname           TEXT NOT NULL,
    agent_version      TEXT NOT NULL,
    labels             TEXT NOT NULL,
    first_seen_ms      INTEGER NOT NULL,
    last_seen_ms       INTEGER NOT NULL,
    last_observed_ms   INTEGER NOT NULL,
    latest_epoch       INTEGER NOT NULL,
    cpu_percent        REAL NOT NULL,
    memory_used_bytes  INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_epochs (
    node          TEXT NOT NULL,
    epoch         INTEGER NOT NULL,
    reports       INTEGER NOT NULL,
    last_seq      INTEGER NOT NULL,
    conflicts     INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (node, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    node        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    observed_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body        BLOB NOT NULL,
    PRIMARY KEY (node, epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    node        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    dropped_ms  INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (node, epoch, first_seq, last_seq)
) WITHOUT ROWID;
