-- Issue 19: training runs (processes that write weight files while mapping other weights or
-- using a GPU), the latest state of each as its agent reported it, and which weight file
-- each run wrote (for a model's `derived_from_run`).
CREATE TABLE training_runs (
    node             TEXT NOT NULL,
    run_id           TEXT NOT NULL,
    pid              BIGINT NOT NULL,
    process          TEXT NOT NULL,
    start_ms         BIGINT NOT NULL,
    last_activity_ms BIGINT NOT NULL,
    gpu_seconds      DOUBLE PRECISION NOT NULL,
    ended            BOOLEAN NOT NULL,
    base_models      TEXT NOT NULL,
    detail           BYTEA NOT NULL,
    first_seen_ms    BIGINT NOT NULL,
    last_seen_ms     BIGINT NOT NULL,
    PRIMARY KEY (node, run_id)
);
CREATE INDEX training_runs_by_activity ON training_runs (last_activity_ms);
CREATE TABLE training_outputs (
    node   TEXT NOT NULL,
    path   TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (node, path)
);
