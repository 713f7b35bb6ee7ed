-- Issue 14, queries at volume: the scorecard counts contested destinations from the minute
-- rows of its range (`contested` grouping), through a partial index on the minute, then one
-- heap fetch per row. This index carries every column that read needs (INCLUDE), so that
-- pages the visibility map marks all-visible are answered from the index alone; it holds
-- contested rows only, like the index it replaces (docs/PERFORMANCE.md §8i).
DROP INDEX flows_minute_contested;
CREATE INDEX flows_minute_contested ON flows_minute (minute_ms)
    INCLUDE (direction, country, node, asn, remote_address, remote_port, org, geo_source,
             bytes_sent, bytes_received, connections, min_rtt_us, answers, contested,
             operator_country, physics, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    WHERE contested <> 0;
