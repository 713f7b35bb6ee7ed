-- Issue 14, seventh round: the report bodies (written by every acknowledgement, read back by
-- the deriver) and the raw foreign flows (written by every derive batch) are TOASTed with lz4
-- instead of pglz where the server has lz4 (PostgreSQL 14 or later built with it): same kind of
-- ratio on protobuf, several times less CPU to compress and to read back. Existing values stay
-- as they were (both methods are read transparently); a server without lz4 keeps pglz.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE reports ALTER COLUMN body SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE foreign_flows ALTER COLUMN flows SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'lz4 compression not available: report bodies stay pglz';
END
$$;
