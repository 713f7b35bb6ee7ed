
CREATE TABLE weight_files (
    node            TEXT NOT NULL,
    path            TEXT NOT NULL,
    format          TEXT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    mtime_ms        BIGINT NOT NULL,
    device          BIGINT NOT NULL,
    inode           BIGINT NOT NULL,
    sha256          TEXT NOT NULL,
    model           TEXT NOT NULL,
    revision        TEXT NOT NULL,
    repo_path       TEXT NOT NULL,
    identity_source TEXT NOT NULL,
    publisher       TEXT NOT NULL,
    parameter_count BIGINT NOT NULL,
    mount_point     TEXT NOT NULL,
    fs_type         TEXT NOT NULL,
    network         BOOLEAN NOT NULL,
    server_address  TEXT NOT NULL,
    users           TEXT NOT NULL,
    detail          BYTEA NOT NULL,
    first_seen_ms   BIGINT NOT NULL,
    last_seen_ms    BIGINT NOT NULL,
    removed_ms      BIGINT,
    PRIMARY KEY (node, path)
);
CREATE INDEX weight_files_by_sha ON weight_files (sha256);
CREATE INDEX weight_files_by_model ON weight_files (model);
