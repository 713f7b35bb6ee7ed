
CREATE TABLE enroll_tokens (
    hash       TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER,
    used_by    TEXT
) WITHOUT ROWID;
