-- Issue 14, replicas that add capacity: the derive queue is split into 64 partitions by a hash
-- of the node's name. Each replica's deriver holds some partitions (session advisory locks on
-- its own connection, shared out among the replicas present) and takes queued reports only
-- from those, so replicas derive in parallel without waiting on each other's queue rows, and
-- a node's reports are derived by one deriver at a time, in queue order. Exactly once still
-- rests on deleting the queue row in the deriving transaction, not on the partitions.
ALTER TABLE derive_queue
    ADD COLUMN part INT NOT NULL GENERATED ALWAYS AS (hashtext(node) & 63) STORED;
CREATE INDEX derive_queue_by_part ON derive_queue (part, id);
