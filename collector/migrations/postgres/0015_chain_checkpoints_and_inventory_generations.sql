-- Issue 17: signed checkpoints of the chained logs' heads. Each row is the head (seq, hash) of
-- the breach log or the audit log at a time, signed with the collector's key (the text of a
-- sov_evidence::checkpoint::SignedCheckpoint). verify-log and verify-audit check the chain
-- against every one of them, so a log rewritten with its hashes recomputed fails.
CREATE TABLE chain_checkpoints (
    log    TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    hash   TEXT NOT NULL,
    at_ms  BIGINT NOT NULL,
    signed TEXT NOT NULL,
    PRIMARY KEY (log, seq)
);

-- Issue 17: a full weight inventory that spans several reports (chunks 0..=N of one
-- generation). The paths of each chunk are kept until the generation is complete; then every
-- other file of the node is marked removed, once, and the generation's rows go.
CREATE TABLE weight_generations (
    node        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    generation  BIGINT NOT NULL,
    -- N + 1 once the chunk with `last` arrived.
    chunk_count BIGINT,
    -- 1 when a chunk withheld weight files without naming every path: removes nothing.
    unnamed     BIGINT NOT NULL DEFAULT 0,
    -- When the first of its chunks arrived (files seen after it are kept).
    started_ms  BIGINT NOT NULL,
    PRIMARY KEY (node, epoch, generation)
);
CREATE TABLE weight_generation_chunks (
    node       TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    idx        BIGINT NOT NULL,
    PRIMARY KEY (node, epoch, generation, idx)
);
CREATE TABLE weight_generation_paths (
    node       TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    path       TEXT NOT NULL,
    PRIMARY KEY (node, epoch, generation, path)
);
-- The newest generation applied per node: an older one completing later changes nothing.
CREATE TABLE weight_generation_applied (
    node       TEXT PRIMARY KEY,
    epoch      BIGINT NOT NULL,
    generation BIGINT NOT NULL
);
