-- Issue 14, queries at volume: the contested level (see the SQLite migration of the same
-- name for the why). Late contested minute rows reach `contested_hour` and, for days already
-- rolled up, `contested_day` through the statement triggers below, which take the rollup's
-- advisory lock shared, as the late-row triggers of 0016 do.
CREATE TABLE contested_hour (
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
    remote_address   TEXT NOT NULL,
    remote_port      BIGINT NOT NULL,
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
                 operator_country, physics, remote_address, remote_port)
);
CREATE TABLE contested_day (
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
    remote_address   TEXT NOT NULL,
    remote_port      BIGINT NOT NULL,
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
                 operator_country, physics, remote_address, remote_port)
);
-- What was rolled up before this migration, from the minute rows still held.
INSERT INTO contested_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT node, minute_ms - (minute_ms % 3600000), pid, process, direction, country, asn, answers, contested,
           operator_country, physics, remote_address, remote_port, MAX(org), MAX(geo_source), SUM(bytes_sent),
           SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0), MAX(distance_km),
           COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes), SUM(unmeasured_flows)
    FROM flows_minute WHERE contested <> 0 AND minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13;
INSERT INTO contested_day (node, day_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
SELECT node, hour_ms - (hour_ms % 86400000), pid, process, direction, country, asn, answers, contested,
           operator_country, physics, remote_address, remote_port, MAX(org), MAX(geo_source), SUM(bytes_sent),
           SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0), MAX(distance_km),
           COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes), SUM(unmeasured_flows)
    FROM contested_hour WHERE hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13;

CREATE FUNCTION sov_flows_minute_contested_late() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hours BIGINT;
    days BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7309475598591748457);
    SELECT r.up_to_ms INTO hours FROM rollup_state r WHERE r.name = 'hourly';
    SELECT r.up_to_ms INTO days FROM rollup_state r WHERE r.name = 'daily';
    IF TG_OP = 'UPDATE' THEN
        UPDATE contested_hour c SET
            bytes_sent = c.bytes_sent - o.bytes_sent,
            bytes_received = c.bytes_received - o.bytes_received,
            connections = c.connections - o.connections,
            conntrack_bytes = c.conntrack_bytes - o.conntrack_bytes,
            unmeasured_flows = c.unmeasured_flows - o.unmeasured_flows
        FROM (SELECT node, minute_ms - (minute_ms % 3600000) AS p, pid, process, direction, country, asn,
                     answers, contested, operator_country, physics, remote_address, remote_port,
                     SUM(bytes_sent) AS bytes_sent, SUM(bytes_received) AS bytes_received,
                     SUM(connections) AS connections, SUM(conntrack_bytes) AS conntrack_bytes,
                     SUM(unmeasured_flows) AS unmeasured_flows
              FROM old_rows WHERE contested <> 0 AND minute_ms < hours
              GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13) o
        WHERE c.hour_ms = o.p AND c.node = o.node AND c.pid = o.pid AND c.process = o.process
          AND c.direction = o.direction AND c.country = o.country AND c.asn = o.asn
          AND c.answers = o.answers AND c.contested = o.contested
          AND c.operator_country = o.operator_country AND c.physics = o.physics
          AND c.remote_address = o.remote_address AND c.remote_port = o.remote_port;
        UPDATE contested_day c SET
            bytes_sent = c.bytes_sent - o.bytes_sent,
            bytes_received = c.bytes_received - o.bytes_received,
            connections = c.connections - o.connections,
            conntrack_bytes = c.conntrack_bytes - o.conntrack_bytes,
            unmeasured_flows = c.unmeasured_flows - o.unmeasured_flows
        FROM (SELECT node, minute_ms - (minute_ms % 86400000) AS p, pid, process, direction, country, asn,
                     answers, contested, operator_country, physics, remote_address, remote_port,
                     SUM(bytes_sent) AS bytes_sent, SUM(bytes_received) AS bytes_received,
                     SUM(connections) AS connections, SUM(conntrack_bytes) AS conntrack_bytes,
                     SUM(unmeasured_flows) AS unmeasured_flows
              FROM old_rows WHERE contested <> 0 AND minute_ms < days
              GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13) o
        WHERE c.day_ms = o.p AND c.node = o.node AND c.pid = o.pid AND c.process = o.process
          AND c.direction = o.direction AND c.country = o.country AND c.asn = o.asn
          AND c.answers = o.answers AND c.contested = o.contested
          AND c.operator_country = o.operator_country AND c.physics = o.physics
          AND c.remote_address = o.remote_address AND c.remote_port = o.remote_port;
    END IF;
    INSERT INTO contested_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT node, minute_ms - (minute_ms % 3600000), pid, process, direction, country, asn, answers, contested,
           operator_country, physics, remote_address, remote_port, MAX(org), MAX(geo_source), SUM(bytes_sent),
           SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0), MAX(distance_km),
           COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes), SUM(unmeasured_flows)
    FROM new_rows WHERE contested <> 0 AND minute_ms < hours
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13
    ON CONFLICT (node, hour_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port) DO UPDATE SET
        bytes_sent = contested_hour.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = contested_hour.bytes_received + EXCLUDED.bytes_received,
        connections = contested_hour.connections + EXCLUDED.connections,
        conntrack_bytes = contested_hour.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = contested_hour.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN contested_hour.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN contested_hour.min_rtt_us
                          ELSE LEAST(contested_hour.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN contested_hour.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN contested_hour.limit_km
                        ELSE LEAST(contested_hour.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(contested_hour.distance_km, EXCLUDED.distance_km),
        org = GREATEST(contested_hour.org, EXCLUDED.org),
        geo_source = GREATEST(contested_hour.geo_source, EXCLUDED.geo_source);
    INSERT INTO contested_day (node, day_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT node, minute_ms - (minute_ms % 86400000), pid, process, direction, country, asn, answers, contested,
           operator_country, physics, remote_address, remote_port, MAX(org), MAX(geo_source), SUM(bytes_sent),
           SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0), MAX(distance_km),
           COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes), SUM(unmeasured_flows)
    FROM new_rows WHERE contested <> 0 AND minute_ms < days
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13
    ON CONFLICT (node, day_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port) DO UPDATE SET
        bytes_sent = contested_day.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = contested_day.bytes_received + EXCLUDED.bytes_received,
        connections = contested_day.connections + EXCLUDED.connections,
        conntrack_bytes = contested_day.conntrack_bytes + EXCLUDED.conntrack_bytes,
        unmeasured_flows = contested_day.unmeasured_flows + EXCLUDED.unmeasured_flows,
        min_rtt_us = CASE WHEN contested_day.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN contested_day.min_rtt_us
                          ELSE LEAST(contested_day.min_rtt_us, EXCLUDED.min_rtt_us) END,
        limit_km = CASE WHEN contested_day.limit_km = 0 THEN EXCLUDED.limit_km
                        WHEN EXCLUDED.limit_km = 0 THEN contested_day.limit_km
                        ELSE LEAST(contested_day.limit_km, EXCLUDED.limit_km) END,
        distance_km = GREATEST(contested_day.distance_km, EXCLUDED.distance_km),
        org = GREATEST(contested_day.org, EXCLUDED.org),
        geo_source = GREATEST(contested_day.geo_source, EXCLUDED.geo_source);
    RETURN NULL;
END;
$$;
CREATE TRIGGER flows_minute_contested_late_insert AFTER INSERT ON flows_minute
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_minute_contested_late();
CREATE TRIGGER flows_minute_contested_late_update AFTER UPDATE ON flows_minute
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sov_flows_minute_contested_late();
