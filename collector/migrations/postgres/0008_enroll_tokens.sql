
CREATE TABLE enroll_tokens (
    hash       TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT,
    used_by    TEXT
);
