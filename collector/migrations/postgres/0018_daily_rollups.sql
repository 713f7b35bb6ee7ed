-- Issue 14, queries at volume, second level: day rows (see the SQLite migration of the same
-- number for the why). Hour rows written or changed later for a day already rolled up (late
-- reports, through the hourly triggers of 0016, which hold the rollup lock shared; the daily
-- rollup holds it exclusively) are carried into their day rows by statement triggers on the
-- hour tables: they run on hour-row writes only, never on the derive statements themselves.
INSERT INTO rollup_state (name, up_to_ms) VALUES ('daily', 0);
CREATE TABLE flows_day (
    node             TEXT NOT NULL,
    day_ms           BIGINT NOT NULL,
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
    PRIMARY KEY (day_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics)
);
CREATE TABLE gpu_usage_day (
    node          TEXT NOT NULL,
    day_ms        BIGINT NOT NULL,
    pid           BIGINT NOT NULL,
    process_name  TEXT NOT NULL,
    pod_namespace TEXT NOT NULL,
    gpu_seconds   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day_ms, node, pid, process_name, pod_namespace)
);

CREATE FUNCTION sov_flows_hour_late() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up_to BIGINT;
BEGIN
    SELECT r.up_to_ms INTO up_to FROM rollup_state r WHERE r.name = 'daily';
    IF TG_OP = 'UPDATE' THEN
        UPDATE flows_day d SET
            bytes_sent = d.bytes_sent - o.bytes_sent,
            bytes_received = d.bytes_received - o.bytes_received,
            connections = d.connections - o.connections,
            conntrack_bytes = d.conntrack_bytes - o.conntrack_bytes,
            unmeasured_flows = d.unmeasured_flows - o.unmeasured_flows
        FROM (SELECT node, hour_ms - (hour_ms % 86400000) AS day_ms, pid, process, direction,
                     country, asn, answers, contested, operator_country, physics,
                     SUM(bytes_sent) AS bytes_sent, SUM(bytes_received) AS bytes_received,
                     SUM(connections) AS connections, SUM(conntrack_bytes) AS conntrack_bytes,
                     SUM(unmeasured_flows) AS unmeasured_flows
              FROM old_rows WHERE hour_ms < up_to
              GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11) o
        WHERE d.day_ms = o.day_ms AND d.node = o.node AND d.pid = o.pid AND d.process = o.process
          AND d.direction = o.direction AND d.country = o.country AND d.asn = o.asn
          AND d.answers = o.answers AND d.contested = o.contested
          AND d.operator_country = o.operator_country AND d.physics = o.physics;
    END IF;
    INSERT INTO flows_day (node, day_ms, pid, process, direction, country, asn, answers, contested,
                           operator_country, physics, org, geo_source, bytes_sent, bytes_received,
                           connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT node, hour_ms - (hour_ms % 86400000), pid, process, direction, country, asn, answers,
           contested, operator_country, physics, MAX(org), MAX(geo_source), SUM(bytes_sent),
           SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0),
           MAX(distance_km), COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes),
           SUM(unmeasured_flows)
    FROM new_rows WHERE hour_ms < up_to
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    ON CONFLICT (day_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics) DO UPDATE SET
        bytes_sent = flows_day.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = flows_day.bytes_received + EXCLUDED.bytes_received,
        connections = flows_day.connections + EXCLUDED.connections,
        conntrack_bytes = flows_day.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = flows_day.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN flows_day.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN flows_day.min_rtt_us
                          ELSE LEAST(flows_day.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN flows_day.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN flows_day.limit_km
                        ELSE LEAST(flows_day.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(flows_day.distance_km, EXCLUDED.distance_km),
        org = GREATEST(flows_day.org, EXCLUDED.org),
        geo_source = GREATEST(flows_day.geo_source, EXCLUDED.geo_source);
    RETURN NULL;
END;
$$;
CREATE TRIGGER flows_hour_late_insert AFTER INSERT ON flows_hour
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_hour_late();
CREATE TRIGGER flows_hour_late_update AFTER UPDATE ON flows_hour
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_hour_late();

CREATE FUNCTION sov_gpu_usage_hour_late() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up_to BIGINT;
BEGIN
    SELECT r.up_to_ms INTO up_to FROM rollup_state r WHERE r.name = 'daily';
    IF TG_OP = 'UPDATE' THEN
        UPDATE gpu_usage_day d SET gpu_seconds = d.gpu_seconds - o.gpu_seconds
        FROM (SELECT node, hour_ms - (hour_ms % 86400000) AS day_ms, pid, process_name, pod_namespace,
                     SUM(gpu_seconds) AS gpu_seconds
              FROM old_rows WHERE hour_ms < up_to GROUP BY 1, 2, 3, 4, 5) o
        WHERE d.day_ms = o.day_ms AND d.node = o.node AND d.pid = o.pid
          AND d.process_name = o.process_name AND d.pod_namespace = o.pod_namespace;
    END IF;
    INSERT INTO gpu_usage_day (node, day_ms, pid, process_name, pod_namespace, gpu_seconds)
    SELECT node, hour_ms - (hour_ms % 86400000), pid, process_name, pod_namespace, SUM(gpu_seconds)
    FROM new_rows WHERE hour_ms < up_to
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (day_ms, node, pid, process_name, pod_namespace) DO UPDATE SET
        gpu_seconds = gpu_usage_day.gpu_seconds + EXCLUDED.gpu_seconds;
    RETURN NULL;
END;
$$;
CREATE TRIGGER gpu_usage_hour_late_insert AFTER INSERT ON gpu_usage_hour
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_gpu_usage_hour_late();
CREATE TRIGGER gpu_usage_hour_late_update AFTER UPDATE ON gpu_usage_hour
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_gpu_usage_hour_late();
