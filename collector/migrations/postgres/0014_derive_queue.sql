-- Issue 14: a report is acknowledged once its key and body are committed; what is derived
-- from it (time series, weight inventories, flow aggregates) is computed later, in batches, by
-- the deriver. Each stored report not yet derived has one row here, inserted in the report's
-- own transaction and deleted in the transaction that derives it: exactly once across
-- crashes and replicas (a second deriver deleting the same row waits for the first one's
-- commit, then deletes nothing and skips the report). Reports stored before this migration
-- were derived when they were stored.
CREATE TABLE derive_queue (
    id          BIGSERIAL PRIMARY KEY,
    node        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE INDEX derive_queue_by_received ON derive_queue (received_ms);
