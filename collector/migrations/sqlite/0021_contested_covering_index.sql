-- Issue 14, queries at volume: the scorecard counts contested destinations from the minute
-- rows of its range (`contested` grouping), through a partial index on the minute. On a
-- table without rowid each index entry then costs a primary-key lookup of its row: at 1,000
-- nodes, 53,000 contested rows an hour cost 0.37 s, mostly pages read one row at a time
-- (docs/PERFORMANCE.md §8i). This index holds every column that read needs, so it is read
-- alone, in order; it holds contested rows only (1 % of the minutes in the bench), like the
-- index it replaces.
DROP INDEX flows_minute_contested;
CREATE INDEX flows_minute_contested ON flows_minute (
    minute_ms, direction, country, node, asn, remote_address, remote_port, org, geo_source,
    bytes_sent, bytes_received, connections, min_rtt_us, answers, contested, operator_country,
    physics, distance_km, limit_km, conntrack_bytes, unmeasured_flows
) WHERE contested <> 0;
