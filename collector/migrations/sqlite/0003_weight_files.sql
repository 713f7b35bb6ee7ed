
CREATE TABLE weight_files (
    node            TEXT NOT NULL,
    path            TEXT NOT NULL,
    format          TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    mtime_ms        INTEGER NOT NULL,
    device          INTEGER NOT NULL,
    inode           INTEGER NOT NULL,
    sha256          TEXT NOT NULL,
    model           TEXT NOT NULL,
    revision        TEXT NOT NULL,
    repo_path       TEXT NOT NULL,
    identity_source TEXT NOT NULL,
    publisher       TEXT NOT NULL,
    parameter_count INTEGER NOT NULL,
    mount_point     TEXT NOT NULL,
    fs_type         TEXT NOT NULL,
    network         INTEGER NOT NULL,
    server_address  TEXT NOT NULL,
    users           TEXT NOT NULL,
    detail          BLOB NOT NULL,
    first_seen_ms   INTEGER NOT NULL,
    last_seen_ms    INTEGER NOT NULL,
    removed_ms      INTEGER,
    PRIMARY KEY (node, path)
) WITHOUT ROWID;
CREATE INDEX weight_files_by_sha ON weight_files (sha256);
CREATE INDEX weight_files_by_model ON weight_files (model);
