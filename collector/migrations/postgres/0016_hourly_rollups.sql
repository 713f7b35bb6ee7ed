-- Issue 14, queries at volume: hourly rollups of the minute rows the regulators' questions
-- read (see the SQLite migration of the same number for the why). Rows derived later for an
-- hour already rolled up (a late report) are added to the hour rows by statement triggers in
-- the deriving transaction; the triggers and the rollup serialise on one advisory lock
-- (shared by derivers, exclusive for the rollup), so no row falls between the two.
CREATE TABLE rollup_state (
    name     TEXT PRIMARY KEY,
    up_to_ms BIGINT NOT NULL
);
INSERT INTO rollup_state (name, up_to_ms) VALUES ('hourly', 0);
CREATE TABLE flows_hour (
    node             TEXT NOT NULL,
    hour_ms          BIGINT NOT NULL,
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
    PRIMARY KEY (hour_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics)
);
CREATE TABLE gpu_usage_hour (
    node          TEXT NOT NULL,
    hour_ms       BIGINT NOT NULL,
    pid           BIGINT NOT NULL,
    process_name  TEXT NOT NULL,
    pod_namespace TEXT NOT NULL,
    gpu_seconds   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour_ms, node, pid, process_name, pod_namespace)
);

CREATE FUNCTION sov_flows_minute_late() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up_to BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7309475598591748457);
    SELECT r.up_to_ms INTO up_to FROM rollup_state r WHERE r.name = 'hourly';
    IF TG_OP = 'UPDATE' THEN
        UPDATE flows_hour h SET
            bytes_sent = h.bytes_sent - o.bytes_sent,
            bytes_received = h.bytes_received - o.bytes_received,
            connections = h.connections - o.connections,
            conntrack_bytes = h.conntrack_bytes - o.conntrack_bytes,
            unmeasured_flows = h.unmeasured_flows - o.unmeasured_flows
        FROM (SELECT node, minute_ms - (minute_ms % 3600000) AS hour_ms, pid, process, direction,
                     country, asn, answers, contested::BIGINT AS contested, operator_country, physics,
                     SUM(bytes_sent) AS bytes_sent, SUM(bytes_received) AS bytes_received,
                     SUM(connections) AS connections, SUM(conntrack_bytes) AS conntrack_bytes,
                     SUM(unmeasured_flows) AS unmeasured_flows
              FROM old_rows WHERE minute_ms < up_to
              GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11) o
        WHERE h.hour_ms = o.hour_ms AND h.node = o.node AND h.pid = o.pid AND h.process = o.process
          AND h.direction = o.direction AND h.country = o.country AND h.asn = o.asn
          AND h.answers = o.answers AND h.contested = o.contested
          AND h.operator_country = o.operator_country AND h.physics = o.physics;
    END IF;
    INSERT INTO flows_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested,
                            operator_country, physics, org, geo_source, bytes_sent, bytes_received,
                            connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT node, minute_ms - (minute_ms % 3600000), pid, process, direction, country, asn, answers,
           contested::BIGINT, operator_country, physics, MAX(org), MAX(geo_source), SUM(bytes_sent),
           SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0),
           MAX(distance_km), COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes),
           SUM(unmeasured_flows)
    FROM new_rows WHERE minute_ms < up_to
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    ON CONFLICT (hour_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        bytes_sent = flows_hour.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = flows_hour.bytes_received + EXCLUDED.bytes_received,
        connections = flows_hour.connections + EXCLUDED.connections,
        conntrack_bytes = flows_hour.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = flows_hour.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN flows_hour.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN flows_hour.min_rtt_us
                          ELSE LEAST(flows_hour.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN flows_hour.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN flows_hour.limit_km
                        ELSE LEAST(flows_hour.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(flows_hour.distance_km, EXCLUDED.distance_km),
        org = GREATEST(flows_hour.org, EXCLUDED.org),
        geo_source = GREATEST(flows_hour.geo_source, EXCLUDED.geo_source);
    RETURN NULL;
END;
$$;
CREATE TRIGGER flows_minute_late_insert AFTER INSERT ON flows_minute
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_minute_late();
CREATE TRIGGER flows_minute_late_update AFTER UPDATE ON flows_minute
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_minute_late();

CREATE FUNCTION sov_gpu_usage_late() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up_to BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7309475598591748457);
    SELECT r.up_to_ms INTO up_to FROM rollup_state r WHERE r.name = 'hourly';
    IF TG_OP = 'UPDATE' THEN
        UPDATE gpu_usage_hour h SET gpu_seconds = h.gpu_seconds - o.gpu_seconds
        FROM (SELECT g.node, g.observed_ms - (g.observed_ms % 3600000) AS hour_ms, g.pid, g.process_name,
                     COALESCE(c.pod_namespace, '') AS pod_namespace, SUM(g.gpu_seconds) AS gpu_seconds
              FROM old_rows g
              LEFT JOIN containers_minute c ON c.node = g.node AND c.pid = g.pid
                   AND c.minute_ms = g.observed_ms - (g.observed_ms % 60000)
              WHERE g.observed_ms < up_to GROUP BY 1, 2, 3, 4, 5) o
        WHERE h.hour_ms = o.hour_ms AND h.node = o.node AND h.pid = o.pid
          AND h.process_name = o.process_name AND h.pod_namespace = o.pod_namespace;
    END IF;
    INSERT INTO gpu_usage_hour (node, hour_ms, pid, process_name, pod_namespace, gpu_seconds)
    SELECT g.node, g.observed_ms - (g.observed_ms % 3600000), g.pid, g.process_name,
           COALESCE(c.pod_namespace, ''), SUM(g.gpu_seconds)
    FROM new_rows g
    LEFT JOIN containers_minute c ON c.node = g.node AND c.pid = g.pid
         AND c.minute_ms = g.observed_ms - (g.observed_ms % 60000)
    WHERE g.observed_ms < up_to
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (hour_ms, node, pid, process_name, pod_namespace) DO UPDATE SET
        gpu_seconds = gpu_usage_hour.gpu_seconds + EXCLUDED.gpu_seconds;
    RETURN NULL;
END;
$$;
CREATE TRIGGER gpu_usage_late_insert AFTER INSERT ON gpu_usage
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_gpu_usage_late();
CREATE TRIGGER gpu_usage_late_update AFTER UPDATE ON gpu_usage
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_gpu_usage_late();
-- The scorecard counts contested destinations from minute rows (hour rows keep no address):
-- without this index that read scans every minute row of the range; contested rows are
-- few, so the index costs the derive path little.
CREATE INDEX flows_minute_contested ON flows_minute (minute_ms) WHERE contested <> 0;
