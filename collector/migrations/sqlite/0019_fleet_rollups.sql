-- Issue 14, queries at volume, fleet level: hour and day rows without the node and the
-- process. At country scale the scorecard's egress (grouped by node site and declared country,
-- destination country, ASN and verdict) and `egress --by country` / `--by asn` read every
-- node's hour and day rows: about 50 per node and period, 1.6 M rows for a week of 1,000
-- nodes. `fleet_hour` and `fleet_day` hold the same sums keyed by (period, node site, node
-- country, direction, destination country, ASN, verdict): what those questions group by and
-- what the policy counts a byte by, a few thousand rows per period whatever the node count.
-- `node` is one node of the group (the least name), which the scorecard places by its site.
-- Each is kept equal to the sums of its node-level table by the triggers below, which fire on
-- every write of an hour or day row (the rollups, and late reports through the triggers of
-- 0016 and 0018), in the same transaction; so the rollups and the late-row path keep them
-- without code of their own. The node's site and country are the ones its `nodes` row holds
-- when its hour or day row is written. Rows are never removed by the triggers: retention
-- prunes each fleet table at its node-level table's cut-off.
CREATE TABLE fleet_hour (
    hour_ms          INTEGER NOT NULL,
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
    PRIMARY KEY (hour_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics)
) WITHOUT ROWID;
CREATE TABLE fleet_day (
    day_ms           INTEGER NOT NULL,
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
    PRIMARY KEY (day_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics)
) WITHOUT ROWID;
-- What was rolled up before this migration.
INSERT INTO fleet_hour (hour_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT r.hour_ms, COALESCE(n.site, ''), COALESCE(n.country, ''), r.direction, r.country, r.asn, r.answers,
       r.contested, r.operator_country, r.physics, MIN(r.node), MAX(r.org), MAX(r.geo_source),
       SUM(r.bytes_sent), SUM(r.bytes_received), SUM(r.connections),
       COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km), COALESCE(MIN(NULLIF(r.limit_km, 0)), 0),
       SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
FROM flows_hour r LEFT JOIN nodes n ON n.node = r.node
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;
INSERT INTO fleet_day (day_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT r.day_ms, COALESCE(n.site, ''), COALESCE(n.country, ''), r.direction, r.country, r.asn, r.answers,
       r.contested, r.operator_country, r.physics, MIN(r.node), MAX(r.org), MAX(r.geo_source),
       SUM(r.bytes_sent), SUM(r.bytes_received), SUM(r.connections),
       COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km), COALESCE(MIN(NULLIF(r.limit_km, 0)), 0),
       SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
FROM flows_day r LEFT JOIN nodes n ON n.node = r.node
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;
-- A row's key never changes: an update adds the difference of the sums (a late minute merged
-- into a rolled-up hour, or the rollup growing the current hour's or day's row).
CREATE TRIGGER flows_hour_fleet_insert AFTER INSERT ON flows_hour
BEGIN
    INSERT INTO fleet_hour (hour_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.hour_ms, COALESCE((SELECT site FROM nodes WHERE node = NEW.node), ''),
            COALESCE((SELECT country FROM nodes WHERE node = NEW.node), ''), NEW.direction, NEW.country,
            NEW.asn, NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.node, NEW.org,
            NEW.geo_source, NEW.bytes_sent, NEW.bytes_received, NEW.connections, NEW.min_rtt_us,
            NEW.distance_km, NEW.limit_km, NEW.conntrack_bytes, NEW.unmeasured_flows)
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
CREATE TRIGGER flows_hour_fleet_update AFTER UPDATE ON flows_hour
BEGIN
    INSERT INTO fleet_hour (hour_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.hour_ms, COALESCE((SELECT site FROM nodes WHERE node = NEW.node), ''),
            COALESCE((SELECT country FROM nodes WHERE node = NEW.node), ''), NEW.direction, NEW.country,
            NEW.asn, NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.node, NEW.org,
            NEW.geo_source, NEW.bytes_sent - OLD.bytes_sent, NEW.bytes_received - OLD.bytes_received, NEW.connections - OLD.connections, NEW.min_rtt_us,
            NEW.distance_km, NEW.limit_km, NEW.conntrack_bytes - OLD.conntrack_bytes, NEW.unmeasured_flows - OLD.unmeasured_flows)
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
CREATE TRIGGER flows_day_fleet_insert AFTER INSERT ON flows_day
BEGIN
    INSERT INTO fleet_day (day_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.day_ms, COALESCE((SELECT site FROM nodes WHERE node = NEW.node), ''),
            COALESCE((SELECT country FROM nodes WHERE node = NEW.node), ''), NEW.direction, NEW.country,
            NEW.asn, NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.node, NEW.org,
            NEW.geo_source, NEW.bytes_sent, NEW.bytes_received, NEW.connections, NEW.min_rtt_us,
            NEW.distance_km, NEW.limit_km, NEW.conntrack_bytes, NEW.unmeasured_flows)
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
CREATE TRIGGER flows_day_fleet_update AFTER UPDATE ON flows_day
BEGIN
    INSERT INTO fleet_day (day_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.day_ms, COALESCE((SELECT site FROM nodes WHERE node = NEW.node), ''),
            COALESCE((SELECT country FROM nodes WHERE node = NEW.node), ''), NEW.direction, NEW.country,
            NEW.asn, NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.node, NEW.org,
            NEW.geo_source, NEW.bytes_sent - OLD.bytes_sent, NEW.bytes_received - OLD.bytes_received, NEW.connections - OLD.connections, NEW.min_rtt_us,
            NEW.distance_km, NEW.limit_km, NEW.conntrack_bytes - OLD.conntrack_bytes, NEW.unmeasured_flows - OLD.unmeasured_flows)
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
