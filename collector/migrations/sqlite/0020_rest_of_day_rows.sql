-- Issue 14, queries at volume: rest-of-day rows, for questions per node (`egress --by
-- process`, `--by node`) over ranges of days. Such a range starts on the hour (OPERATOR.md,
-- "Time ranges") and its first, partial day was read from up to 23 hours of hour rows per
-- node: about 1.1 M rows at 1,000 nodes, most of what `egress --since 7d --by process` read.
-- `flows_rest` holds, for each hour H of a day after its first, the node's hour rows from H to
-- the end of that day summed with the keys of the hour and day rows (`from_ms` = H): the
-- first partial day of a range is one row set, as a whole day is. Written by the daily
-- rollup with the day rows (`store::rollup::ROLL_FLOWS_REST`: each rolled hour is added to
-- the rows of every start up to it), and for hour rows written or changed later for a day
-- already rolled up (late reports) by the triggers below, in the same transaction; pruned
-- with the hour rows. `day_hours` numbers the hours of a day after the first (1..23).
CREATE TABLE day_hours (k INTEGER PRIMARY KEY);
INSERT INTO day_hours (k) VALUES (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15), (16), (17), (18), (19), (20), (21), (22), (23);
CREATE TABLE flows_rest (
    node             TEXT NOT NULL,
    from_ms          INTEGER NOT NULL,
    pid              INTEGER NOT NULL,
    process          TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              INTEGER NOT NULL,
    answers          TEXT NOT NULL,
    contested        INTEGER NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
    org              TEXT NOT NULL,
    geo_source       TEXT NOT NULL,
    bytes_sent       INTEGER NOT NULL,
    bytes_received   INTEGER NOT NULL,
    connections      INTEGER NOT NULL,
    min_rtt_us       INTEGER NOT NULL,
    distance_km      INTEGER NOT NULL,
    limit_km         INTEGER NOT NULL,
    conntrack_bytes  INTEGER NOT NULL,
    unmeasured_flows INTEGER NOT NULL,
    PRIMARY KEY (from_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics)
) WITHOUT ROWID;
-- The days rolled up before this migration, from the hour rows still kept.
INSERT INTO flows_rest (node, from_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT h.node, h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000, h.pid, h.process, h.direction, h.country,
       h.asn, h.answers, h.contested, h.operator_country, h.physics, MAX(h.org), MAX(h.geo_source),
       SUM(h.bytes_sent), SUM(h.bytes_received), SUM(h.connections), COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0),
       MAX(h.distance_km), COALESCE(MIN(NULLIF(h.limit_km, 0)), 0), SUM(h.conntrack_bytes), SUM(h.unmeasured_flows)
FROM flows_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
WHERE h.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11;
CREATE TRIGGER flows_hour_rest_insert AFTER INSERT ON flows_hour
WHEN NEW.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    INSERT INTO flows_rest (node, from_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.node, NEW.hour_ms - (NEW.hour_ms % 86400000) + k * 3600000, NEW.pid, NEW.process,
           NEW.direction, NEW.country, NEW.asn, NEW.answers, NEW.contested, NEW.operator_country,
           NEW.physics, NEW.org, NEW.geo_source, NEW.bytes_sent, NEW.bytes_received,
           NEW.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes, NEW.unmeasured_flows
    FROM day_hours WHERE k * 3600000 <= NEW.hour_ms % 86400000
    ON CONFLICT DO UPDATE SET
        bytes_sent = bytes_sent + excluded.bytes_sent,
        bytes_received = bytes_received + excluded.bytes_received,
        connections = connections + excluded.connections,
        conntrack_bytes = conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = unmeasured_flows + excluded.unmeasured_flows,
        min_rtt_us = CASE WHEN min_rtt_us = 0 THEN excluded.min_rtt_us
                          WHEN excluded.min_rtt_us = 0 THEN min_rtt_us
                          ELSE min(min_rtt_us, excluded.min_rtt_us) END,
        limit_km = CASE WHEN limit_km = 0 THEN excluded.limit_km
                        WHEN excluded.limit_km = 0 THEN limit_km
                        ELSE min(limit_km, excluded.limit_km) END,
        distance_km = max(distance_km, excluded.distance_km),
        org = max(org, excluded.org),
        geo_source = max(geo_source, excluded.geo_source);
END;
-- An hour row's key never changes: its rest-of-day rows take the difference of the sums.
CREATE TRIGGER flows_hour_rest_update AFTER UPDATE ON flows_hour
WHEN OLD.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    INSERT INTO flows_rest (node, from_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.node, NEW.hour_ms - (NEW.hour_ms % 86400000) + k * 3600000, NEW.pid, NEW.process,
           NEW.direction, NEW.country, NEW.asn, NEW.answers, NEW.contested, NEW.operator_country,
           NEW.physics, NEW.org, NEW.geo_source, NEW.bytes_sent - OLD.bytes_sent, NEW.bytes_received - OLD.bytes_received,
           NEW.connections - OLD.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes - OLD.conntrack_bytes, NEW.unmeasured_flows - OLD.unmeasured_flows
    FROM day_hours WHERE k * 3600000 <= NEW.hour_ms % 86400000
    ON CONFLICT DO UPDATE SET
        bytes_sent = bytes_sent + excluded.bytes_sent,
        bytes_received = bytes_received + excluded.bytes_received,
        connections = connections + excluded.connections,
        conntrack_bytes = conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = unmeasured_flows + excluded.unmeasured_flows,
        min_rtt_us = CASE WHEN min_rtt_us = 0 THEN excluded.min_rtt_us
                          WHEN excluded.min_rtt_us = 0 THEN min_rtt_us
                          ELSE min(min_rtt_us, excluded.min_rtt_us) END,
        limit_km = CASE WHEN limit_km = 0 THEN excluded.limit_km
                        WHEN excluded.limit_km = 0 THEN limit_km
                        ELSE min(limit_km, excluded.limit_km) END,
        distance_km = max(distance_km, excluded.distance_km),
        org = max(org, excluded.org),
        geo_source = max(geo_source, excluded.geo_source);
END;
-- The same for the fleet rows (`fleet_rest`, from `fleet_hour`; migration 0019): the first
-- partial day of a fleet question (the scorecard, `egress --by country`) is one row set too.
CREATE TABLE fleet_rest (
    from_ms          INTEGER NOT NULL,
    node_site        TEXT NOT NULL,
    node_country     TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              INTEGER NOT NULL,
    answers          TEXT NOT NULL,
    contested        INTEGER NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
    node             TEXT NOT NULL,
    org              TEXT NOT NULL,
    geo_source       TEXT NOT NULL,
    bytes_sent       INTEGER NOT NULL,
    bytes_received   INTEGER NOT NULL,
    connections      INTEGER NOT NULL,
    min_rtt_us       INTEGER NOT NULL,
    distance_km      INTEGER NOT NULL,
    limit_km         INTEGER NOT NULL,
    conntrack_bytes  INTEGER NOT NULL,
    unmeasured_flows INTEGER NOT NULL,
    PRIMARY KEY (from_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics)
) WITHOUT ROWID;
INSERT INTO fleet_rest (from_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000, h.node_site, h.node_country, h.direction, h.country,
       h.asn, h.answers, h.contested, h.operator_country, h.physics, MIN(h.node), MAX(h.org), MAX(h.geo_source),
       SUM(h.bytes_sent), SUM(h.bytes_received), SUM(h.connections), COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0),
       MAX(h.distance_km), COALESCE(MIN(NULLIF(h.limit_km, 0)), 0), SUM(h.conntrack_bytes), SUM(h.unmeasured_flows)
FROM fleet_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
WHERE h.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;
CREATE TRIGGER fleet_hour_rest_insert AFTER INSERT ON fleet_hour
WHEN NEW.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    INSERT INTO fleet_rest (from_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.hour_ms - (NEW.hour_ms % 86400000) + k * 3600000, NEW.node_site, NEW.node_country,
           NEW.direction, NEW.country, NEW.asn, NEW.answers, NEW.contested, NEW.operator_country,
           NEW.physics, NEW.node, NEW.org, NEW.geo_source, NEW.bytes_sent, NEW.bytes_received,
           NEW.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes, NEW.unmeasured_flows
    FROM day_hours WHERE k * 3600000 <= NEW.hour_ms % 86400000
    ON CONFLICT DO UPDATE SET
        node = min(node, excluded.node),
        bytes_sent = bytes_sent + excluded.bytes_sent,
        bytes_received = bytes_received + excluded.bytes_received,
        connections = connections + excluded.connections,
        conntrack_bytes = conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = unmeasured_flows + excluded.unmeasured_flows,
        min_rtt_us = CASE WHEN min_rtt_us = 0 THEN excluded.min_rtt_us
                          WHEN excluded.min_rtt_us = 0 THEN min_rtt_us
                          ELSE min(min_rtt_us, excluded.min_rtt_us) END,
        limit_km = CASE WHEN limit_km = 0 THEN excluded.limit_km
                        WHEN excluded.limit_km = 0 THEN limit_km
                        ELSE min(limit_km, excluded.limit_km) END,
        distance_km = max(distance_km, excluded.distance_km),
        org = max(org, excluded.org),
        geo_source = max(geo_source, excluded.geo_source);
END;
CREATE TRIGGER fleet_hour_rest_update AFTER UPDATE ON fleet_hour
WHEN OLD.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    INSERT INTO fleet_rest (from_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.hour_ms - (NEW.hour_ms % 86400000) + k * 3600000, NEW.node_site, NEW.node_country,
           NEW.direction, NEW.country, NEW.asn, NEW.answers, NEW.contested, NEW.operator_country,
           NEW.physics, NEW.node, NEW.org, NEW.geo_source, NEW.bytes_sent - OLD.bytes_sent, NEW.bytes_received - OLD.bytes_received,
           NEW.connections - OLD.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes - OLD.conntrack_bytes, NEW.unmeasured_flows - OLD.unmeasured_flows
    FROM day_hours WHERE k * 3600000 <= NEW.hour_ms % 86400000
    ON CONFLICT DO UPDATE SET
        node = min(node, excluded.node),
        bytes_sent = bytes_sent + excluded.bytes_sent,
        bytes_received = bytes_received + excluded.bytes_received,
        connections = connections + excluded.connections,
        conntrack_bytes = conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = unmeasured_flows + excluded.unmeasured_flows,
        min_rtt_us = CASE WHEN min_rtt_us = 0 THEN excluded.min_rtt_us
                          WHEN excluded.min_rtt_us = 0 THEN min_rtt_us
                          ELSE min(min_rtt_us, excluded.min_rtt_us) END,
        limit_km = CASE WHEN limit_km = 0 THEN excluded.limit_km
                        WHEN excluded.limit_km = 0 THEN limit_km
                        ELSE min(limit_km, excluded.limit_km) END,
        distance_km = max(distance_km, excluded.distance_km),
        org = max(org, excluded.org),
        geo_source = max(geo_source, excluded.geo_source);
END;
