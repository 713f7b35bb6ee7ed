-- Issue 14, queries at volume: rest-of-day rows, for questions per node (`egress --by
-- process`, `--by node`) over ranges of days. Such a range starts on the hour (OPERATOR.md,
-- "Time ranges") and its first, partial day was read from up to 23 hours of hour rows per
-- node: about 1.1 M rows at 1,000 nodes, most of what `egress --since 7d --by process` read.
-- `flows_rest` holds, for each hour H of a day after its first, the node's hour rows from H to
-- the end of that day summed with the keys of the hour and day rows (`from_ms` = H): the
-- first partial day of a range is one row set, as a whole day is. Written by the daily
-- rollup with the day rows (`store::rollup::ROLL_FLOWS_REST`: each rolled hour is added to
-- the rows of every start up to it), and for hour rows written or changed later for a day
-- already rolled up (late reports) by the statement triggers below, in the same transaction; pruned
-- with the hour rows. `day_hours` numbers the hours of a day after the first (1..23).
CREATE TABLE day_hours (k BIGINT PRIMARY KEY);
INSERT INTO day_hours (k) VALUES (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15), (16), (17), (18), (19), (20), (21), (22), (23);
CREATE TABLE flows_rest (
    node             TEXT NOT NULL,
    from_ms          BIGINT NOT NULL,
    pid              BIGINT NOT NULL,
    process          TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              BIGINT NOT NULL,
    answers          TEXT NOT NULL,
    contested        BIGINT NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
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
    PRIMARY KEY (from_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics)
);
-- The days rolled up before this migration, from the hour rows still kept.
INSERT INTO flows_rest (node, from_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT h.node, h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000, h.pid, h.process, h.direction, h.country,
       h.asn, h.answers, h.contested, h.operator_country, h.physics, MAX(h.org), MAX(h.geo_source),
       SUM(h.bytes_sent), SUM(h.bytes_received), SUM(h.connections), COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0),
       MAX(h.distance_km), COALESCE(MIN(NULLIF(h.limit_km, 0)), 0), SUM(h.conntrack_bytes), SUM(h.unmeasured_flows)
FROM flows_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
WHERE h.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11;

CREATE FUNCTION sov_flows_hour_rest() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up_to BIGINT;
BEGIN
    SELECT s.up_to_ms INTO up_to FROM rollup_state s WHERE s.name = 'daily';
    IF TG_OP = 'UPDATE' THEN
        -- The new sums in, the old ones out (their minima and maxima are already in).
        INSERT INTO flows_rest (node, from_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.node, r.hour_ms - (r.hour_ms % 86400000) + k.k * 3600000, r.pid, r.process, r.direction,
               r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics, MAX(r.org),
               MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received), SUM(r.connections),
               COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
               COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM (SELECT node, hour_ms, pid, process, direction, country, asn, answers, contested,
                     operator_country, physics, org, geo_source, bytes_sent, bytes_received,
                     connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows
              FROM new_rows
              UNION ALL
              SELECT node, hour_ms, pid, process, direction, country, asn, answers, contested,
                     operator_country, physics, '', '', -bytes_sent, -bytes_received, -connections,
                     0, 0, 0, -conntrack_bytes, -unmeasured_flows FROM old_rows) r
        JOIN day_hours k ON k.k * 3600000 <= r.hour_ms % 86400000
        WHERE r.hour_ms < up_to
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
        ON CONFLICT (from_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        bytes_sent = flows_rest.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = flows_rest.bytes_received + EXCLUDED.bytes_received,
        connections = flows_rest.connections + EXCLUDED.connections,
        conntrack_bytes = flows_rest.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = flows_rest.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN flows_rest.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN flows_rest.min_rtt_us
                          ELSE LEAST(flows_rest.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN flows_rest.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN flows_rest.limit_km
                        ELSE LEAST(flows_rest.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(flows_rest.distance_km, EXCLUDED.distance_km),
        org = GREATEST(flows_rest.org, EXCLUDED.org),
        geo_source = GREATEST(flows_rest.geo_source, EXCLUDED.geo_source);
    ELSE
        INSERT INTO flows_rest (node, from_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.node, r.hour_ms - (r.hour_ms % 86400000) + k.k * 3600000, r.pid, r.process, r.direction,
               r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics, MAX(r.org),
               MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received), SUM(r.connections),
               COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
               COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM new_rows r JOIN day_hours k ON k.k * 3600000 <= r.hour_ms % 86400000
        WHERE r.hour_ms < up_to
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
        ON CONFLICT (from_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        bytes_sent = flows_rest.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = flows_rest.bytes_received + EXCLUDED.bytes_received,
        connections = flows_rest.connections + EXCLUDED.connections,
        conntrack_bytes = flows_rest.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = flows_rest.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN flows_rest.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN flows_rest.min_rtt_us
                          ELSE LEAST(flows_rest.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN flows_rest.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN flows_rest.limit_km
                        ELSE LEAST(flows_rest.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(flows_rest.distance_km, EXCLUDED.distance_km),
        org = GREATEST(flows_rest.org, EXCLUDED.org),
        geo_source = GREATEST(flows_rest.geo_source, EXCLUDED.geo_source);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER flows_hour_rest_insert AFTER INSERT ON flows_hour
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_hour_rest();
CREATE TRIGGER flows_hour_rest_update AFTER UPDATE ON flows_hour
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_hour_rest();

-- The same for the fleet rows (`fleet_rest`, from `fleet_hour`; migration 0019): the first
-- partial day of a fleet question (the scorecard, `egress --by country`) is one row set too.
CREATE TABLE fleet_rest (
    from_ms          BIGINT NOT NULL,
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
    PRIMARY KEY (from_ms, node_site, node_country, direction, country, asn, answers, contested,
                 operator_country, physics)
);
INSERT INTO fleet_rest (from_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000, h.node_site, h.node_country, h.direction, h.country,
       h.asn, h.answers, h.contested, h.operator_country, h.physics, MIN(h.node), MAX(h.org), MAX(h.geo_source),
       SUM(h.bytes_sent), SUM(h.bytes_received), SUM(h.connections), COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0),
       MAX(h.distance_km), COALESCE(MIN(NULLIF(h.limit_km, 0)), 0), SUM(h.conntrack_bytes), SUM(h.unmeasured_flows)
FROM fleet_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
WHERE h.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;

CREATE FUNCTION sov_fleet_hour_rest() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up_to BIGINT;
BEGIN
    SELECT s.up_to_ms INTO up_to FROM rollup_state s WHERE s.name = 'daily';
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO fleet_rest (from_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.hour_ms - (r.hour_ms % 86400000) + k.k * 3600000, r.node_site, r.node_country, r.direction,
               r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics, MIN(r.node), MAX(r.org),
               MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received), SUM(r.connections),
               COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
               COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM (SELECT hour_ms, node_site, node_country, direction, country, asn, answers, contested,
                     operator_country, physics, node, org, geo_source, bytes_sent, bytes_received,
                     connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows
              FROM new_rows
              UNION ALL
              SELECT hour_ms, node_site, node_country, direction, country, asn, answers, contested,
                     operator_country, physics, node, '', '', -bytes_sent, -bytes_received, -connections,
                     0, 0, 0, -conntrack_bytes, -unmeasured_flows FROM old_rows) r
        JOIN day_hours k ON k.k * 3600000 <= r.hour_ms % 86400000
        WHERE r.hour_ms < up_to
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (from_ms, node_site, node_country, direction, country, asn, answers, contested,
                     operator_country, physics) DO UPDATE SET
            node = LEAST(fleet_rest.node, EXCLUDED.node),
            bytes_sent = fleet_rest.bytes_sent + EXCLUDED.bytes_sent,
            bytes_received = fleet_rest.bytes_received + EXCLUDED.bytes_received,
            connections = fleet_rest.connections + EXCLUDED.connections,
            conntrack_bytes = fleet_rest.conntrack_bytes + EXCLUDED.conntrack_bytes,
            unmeasured_flows = fleet_rest.unmeasured_flows + EXCLUDED.unmeasured_flows,
            min_rtt_us = CASE WHEN fleet_rest.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                              WHEN EXCLUDED.min_rtt_us = 0 THEN fleet_rest.min_rtt_us
                              ELSE LEAST(fleet_rest.min_rtt_us, EXCLUDED.min_rtt_us) END,
            limit_km = CASE WHEN fleet_rest.limit_km = 0 THEN EXCLUDED.limit_km
                            WHEN EXCLUDED.limit_km = 0 THEN fleet_rest.limit_km
                            ELSE LEAST(fleet_rest.limit_km, EXCLUDED.limit_km) END,
            distance_km = GREATEST(fleet_rest.distance_km, EXCLUDED.distance_km),
            org = GREATEST(fleet_rest.org, EXCLUDED.org),
            geo_source = GREATEST(fleet_rest.geo_source, EXCLUDED.geo_source);
    ELSE
        INSERT INTO fleet_rest (from_ms, node_site, node_country, direction, country, asn, answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
        SELECT r.hour_ms - (r.hour_ms % 86400000) + k.k * 3600000, r.node_site, r.node_country, r.direction,
               r.country, r.asn, r.answers, r.contested, r.operator_country, r.physics, MIN(r.node), MAX(r.org),
               MAX(r.geo_source), SUM(r.bytes_sent), SUM(r.bytes_received), SUM(r.connections),
               COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0), MAX(r.distance_km),
               COALESCE(MIN(NULLIF(r.limit_km, 0)), 0), SUM(r.conntrack_bytes), SUM(r.unmeasured_flows)
        FROM new_rows r JOIN day_hours k ON k.k * 3600000 <= r.hour_ms % 86400000
        WHERE r.hour_ms < up_to
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (from_ms, node_site, node_country, direction, country, asn, answers, contested,
                     operator_country, physics) DO UPDATE SET
            node = LEAST(fleet_rest.node, EXCLUDED.node),
            bytes_sent = fleet_rest.bytes_sent + EXCLUDED.bytes_sent,
            bytes_received = fleet_rest.bytes_received + EXCLUDED.bytes_received,
            connections = fleet_rest.connections + EXCLUDED.connections,
            conntrack_bytes = fleet_rest.conntrack_bytes + EXCLUDED.conntrack_bytes,
            unmeasured_flows = fleet_rest.unmeasured_flows + EXCLUDED.unmeasured_flows,
            min_rtt_us = CASE WHEN fleet_rest.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                              WHEN EXCLUDED.min_rtt_us = 0 THEN fleet_rest.min_rtt_us
                              ELSE LEAST(fleet_rest.min_rtt_us, EXCLUDED.min_rtt_us) END,
            limit_km = CASE WHEN fleet_rest.limit_km = 0 THEN EXCLUDED.limit_km
                            WHEN EXCLUDED.limit_km = 0 THEN fleet_rest.limit_km
                            ELSE LEAST(fleet_rest.limit_km, EXCLUDED.limit_km) END,
            distance_km = GREATEST(fleet_rest.distance_km, EXCLUDED.distance_km),
            org = GREATEST(fleet_rest.org, EXCLUDED.org),
            geo_source = GREATEST(fleet_rest.geo_source, EXCLUDED.geo_source);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER fleet_hour_rest_insert AFTER INSERT ON fleet_hour
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_fleet_hour_rest();
CREATE TRIGGER fleet_hour_rest_update AFTER UPDATE ON fleet_hour
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_fleet_hour_rest();
