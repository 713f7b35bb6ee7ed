-- Issue 13: who each process was in container terms (runtime, container, image, Kubernetes
-- pod), per node, minute and pid, as the agent named it on the report's processes, flows and
-- GPU processes. Flows and GPU usage join it on (node, minute, pid).
CREATE TABLE containers_minute (
    node           TEXT NOT NULL,
    minute_ms      INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    runtime        TEXT NOT NULL,
    container_id   TEXT NOT NULL,
    container_name TEXT NOT NULL,
    image          TEXT NOT NULL,
    image_digest   TEXT NOT NULL,
    pod_namespace  TEXT NOT NULL,
    pod_name       TEXT NOT NULL,
    pod_uid        TEXT NOT NULL,
    source         TEXT NOT NULL,
    PRIMARY KEY (node, minute_ms, pid)
) WITHOUT ROWID;
CREATE INDEX containers_minute_by_time ON containers_minute (minute_ms);
