-- Issue 14: a report is acknowledged once its key and body are committed; what is derived
-- from it (time series, weight inventories, flow aggregates) is computed later, in batches, by
-- the deriver. Each stored report not yet derived has one row here, inserted in the report's
-- own transaction and deleted in the transaction that derives it: exactly once across
-- crashes. Reports stored before this migration were derived when they were stored.
CREATE TABLE derive_queue (
    id          INTEGER PRIMARY KEY,
    node        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX derive_queue_by_received ON derive_queue (received_ms);
