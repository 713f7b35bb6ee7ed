-- Issue 14, queries at volume, fleet level (the SQLite migration 0019 does the same): hour
-- and day rows without the node and the process. At country scale the scorecard's egress (grouped by node site and declared country,
-- destination country, ASN and verdict) and `egress --by country` / `--by asn` read every
-- node's hour and day rows: about 50 per node and period, 1.6 M rows for a week of 1,000
-- nodes. `fleet_hour` and `fleet_day` hold the same sums keyed by (period, node site, node
-- country, direction, destination country, ASN, verdict): what those questions group by and
-- what the policy counts a byte by, a few thousand rows per period whatever the node count.
-- `node` is one node of the group (the least name), which the scorecard places by its site.
-- Each is kept equal to the sums of its node-level table by the statement triggers below,
-- which run on every write of an hour or day row (the rollups, and late reports through the
-- triggers of 0016 and 0018), in the same transaction; so the rollups and the late-row path keep them
-- without code of their own. The node's site and country are the ones its `nodes` row holds
-- when its hour or day row is written. Rows are never removed by the triggers: retention
-- prunes each fleet table at its node-level table's cut-off.
-- Rows are upserted in key order, so two deriving transactions that carry late rows into
-- the same fleet rows lock them in the same order (no deadlock between partitioned derivers).
CREATE TABLE fleet_hour (
    hour_ms          BIGINT NOT NULL,
    node_site        TEXT NOT NULL,
    node_country     TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              BIGINT NOT NULL,
    answers          TEXT NOT NULL,
    contested        BIGINT NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
    node             TEXT NOT NULL,
    org              TEXT NOT NULL,
    geo_source       TEXT NOT NULL,
    bytes_sent       BIGINT NOT NULL,
    bytes_received   BIGINT NOT NULL,
    connections      BIGINT NOT NULL,
    min_rtt_us       BIGINT NOT NULL,
    distance_km      BIGINT NOT NULL,
    limit_km         BIGINT NOT NULL,
    conntrack_bytes  BIGINT NOT NULL,
    unmeasured_flows BIGINT NOT NULL,
    PRIMARY KEY (hour_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics)
);
CREATE TABLE fleet_day (
    day_ms           BIGINT NOT NULL,
    node_site        TEXT NOT NULL,
    node_country     TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              BIGINT NOT NULL,
    answers          TEXT NOT NULL,
    contested        BIGINT NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
    node             TEXT NOT NULL,
    org              TEXT NOT NULL,
    geo_source       TEXT NOT NULL,
    bytes_sent       BIGINT NOT NULL,
    bytes_received   BIGINT NOT NULL,
    connections      BIGINT NOT NULL,
    min_rtt_us       BIGINT NOT NULL,
    distance_km      BIGINT NOT NULL,
    limit_km         BIGINT NOT NULL,
    conntrack_bytes  BIGINT NOT NULL,
    unmeasured_flows BIGINT NOT NULL,
    PRIMARY KEY (day_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics)
);
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

CREATE FUNCTION sov_flows_hour_fleet() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- The new sums in, the old ones out (their minima and maxima are already in).
        INSERT INTO fleet_hour (hour_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.hour_ms, COALESCE(n.site, ''), COALESCE(n.country, ''), r.direction, r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics,
           MIN(r.node), MAX(r.org), MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received),
           SUM(r.connections), COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
           COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM (SELECT node, hour_ms, pid, process, direction, country, asn, answers, contested,
                     operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections,
                     min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows FROM new_rows
              UNION ALL
              SELECT node, hour_ms, pid, process, direction, country, asn, answers, contested,
                     operator_country, physics, '', '', -bytes_sent, -bytes_received, -connections,
                     0, 0, 0, -conntrack_bytes, -unmeasured_flows FROM old_rows) r
        LEFT JOIN nodes n ON n.node = r.node
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (hour_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        node = LEAST(fleet_hour.node, EXCLUDED.node),
        bytes_sent = fleet_hour.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = fleet_hour.bytes_received + EXCLUDED.bytes_received,
        connections = fleet_hour.connections + EXCLUDED.connections,
        conntrack_bytes = fleet_hour.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = fleet_hour.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN fleet_hour.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN fleet_hour.min_rtt_us
                          ELSE LEAST(fleet_hour.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN fleet_hour.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN fleet_hour.limit_km
                        ELSE LEAST(fleet_hour.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(fleet_hour.distance_km, EXCLUDED.distance_km),
        org = GREATEST(fleet_hour.org, EXCLUDED.org),
        geo_source = GREATEST(fleet_hour.geo_source, EXCLUDED.geo_source);
    ELSE
        INSERT INTO fleet_hour (hour_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.hour_ms, COALESCE(n.site, ''), COALESCE(n.country, ''), r.direction, r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics,
           MIN(r.node), MAX(r.org), MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received),
           SUM(r.connections), COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
           COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM new_rows r LEFT JOIN nodes n ON n.node = r.node
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (hour_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        node = LEAST(fleet_hour.node, EXCLUDED.node),
        bytes_sent = fleet_hour.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = fleet_hour.bytes_received + EXCLUDED.bytes_received,
        connections = fleet_hour.connections + EXCLUDED.connections,
        conntrack_bytes = fleet_hour.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = fleet_hour.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN fleet_hour.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN fleet_hour.min_rtt_us
                          ELSE LEAST(fleet_hour.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN fleet_hour.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN fleet_hour.limit_km
                        ELSE LEAST(fleet_hour.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(fleet_hour.distance_km, EXCLUDED.distance_km),
        org = GREATEST(fleet_hour.org, EXCLUDED.org),
        geo_source = GREATEST(fleet_hour.geo_source, EXCLUDED.geo_source);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER flows_hour_fleet_insert AFTER INSERT ON flows_hour
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_hour_fleet();
CREATE TRIGGER flows_hour_fleet_update AFTER UPDATE ON flows_hour
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_hour_fleet();

CREATE FUNCTION sov_flows_day_fleet() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- The new sums in, the old ones out (their minima and maxima are already in).
        INSERT INTO fleet_day (day_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.day_ms, COALESCE(n.site, ''), COALESCE(n.country, ''), r.direction, r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics,
           MIN(r.node), MAX(r.org), MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received),
           SUM(r.connections), COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
           COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM (SELECT node, day_ms, pid, process, direction, country, asn, answers, contested,
                     operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections,
                     min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows FROM new_rows
              UNION ALL
              SELECT node, day_ms, pid, process, direction, country, asn, answers, contested,
                     operator_country, physics, '', '', -bytes_sent, -bytes_received, -connections,
                     0, 0, 0, -conntrack_bytes, -unmeasured_flows FROM old_rows) r
        LEFT JOIN nodes n ON n.node = r.node
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (day_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        node = LEAST(fleet_day.node, EXCLUDED.node),
        bytes_sent = fleet_day.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = fleet_day.bytes_received + EXCLUDED.bytes_received,
        connections = fleet_day.connections + EXCLUDED.connections,
        conntrack_bytes = fleet_day.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = fleet_day.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN fleet_day.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN fleet_day.min_rtt_us
                          ELSE LEAST(fleet_day.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN fleet_day.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN fleet_day.limit_km
                        ELSE LEAST(fleet_day.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(fleet_day.distance_km, EXCLUDED.distance_km),
        org = GREATEST(fleet_day.org, EXCLUDED.org),
        geo_source = GREATEST(fleet_day.geo_source, EXCLUDED.geo_source);
    ELSE
        INSERT INTO fleet_day (day_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.day_ms, COALESCE(n.site, ''), COALESCE(n.country, ''), r.direction, r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics,
           MIN(r.node), MAX(r.org), MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received),
           SUM(r.connections), COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
           COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM new_rows r LEFT JOIN nodes n ON n.node = r.node
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (day_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        node = LEAST(fleet_day.node, EXCLUDED.node),
        bytes_sent = fleet_day.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = fleet_day.bytes_received + EXCLUDED.bytes_received,
        connections = fleet_day.connections + EXCLUDED.connections,
        conntrack_bytes = fleet_day.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = fleet_day.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN fleet_day.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN fleet_day.min_rtt_us
                          ELSE LEAST(fleet_day.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN fleet_day.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN fleet_day.limit_km
                        ELSE LEAST(fleet_day.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(fleet_day.distance_km, EXCLUDED.distance_km),
        org = GREATEST(fleet_day.org, EXCLUDED.org),
        geo_source = GREATEST(fleet_day.geo_source, EXCLUDED.geo_source);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER flows_day_fleet_insert AFTER INSERT ON flows_day
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_day_fleet();
CREATE TRIGGER flows_day_fleet_update AFTER UPDATE ON flows_day
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_day_fleet();

