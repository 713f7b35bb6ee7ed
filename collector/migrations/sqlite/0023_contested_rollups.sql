-- Issue 14, queries at volume: the contested level. The scorecard counts contested
-- destinations (distinct address and port with a contested verdict, reached from inside the
-- jurisdiction) through the `contested` egress grouping, which hour and day rows could not
-- answer (they keep no address): a 30-day scorecard read every contested minute row of the
-- range (about 5.8 M at 1,000 nodes with 8 days of minutes). `contested_hour` and
-- `contested_day` hold the contested rows only (`contested <> 0`), keyed as `flows_hour` and
-- `flows_day` plus the destination (address, port), with the same sums; the rollups fill them
-- with the hour and day rows (`ROLL_CONTESTED`, `ROLL_CONTESTED_DAY`), retention prunes them
-- with `flows_hour` and `flows_day`. A contested minute row written or changed later for an
-- hour already rolled up (a late report) is added to its hour row, and to its day row when its
-- day is rolled up too, by the triggers below, in the same transaction: one step from the
-- minute row to both levels, no trigger on the contested rows themselves.
CREATE TABLE contested_hour (
    node             TEXT NOT NULL,
    hour_ms          INTEGER NOT NULL,
    pid              INTEGER NOT NULL,
    process          TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              INTEGER NOT NULL,
    answers          TEXT NOT NULL,
    contested        INTEGER NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
    remote_address   TEXT NOT NULL,
    remote_port      INTEGER NOT NULL,
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
    PRIMARY KEY (hour_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics, remote_address, remote_port)
) WITHOUT ROWID;
CREATE TABLE contested_day (
    node             TEXT NOT NULL,
    day_ms           INTEGER NOT NULL,
    pid              INTEGER NOT NULL,
    process          TEXT NOT NULL,
    direction        TEXT NOT NULL,
    country          TEXT NOT NULL,
    asn              INTEGER NOT NULL,
    answers          TEXT NOT NULL,
    contested        INTEGER NOT NULL,
    operator_country TEXT NOT NULL,
    physics          TEXT NOT NULL,
    remote_address   TEXT NOT NULL,
    remote_port      INTEGER NOT NULL,
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
    PRIMARY KEY (day_ms, node, pid, process, direction, country, asn, answers, contested,
                 operator_country, physics, remote_address, remote_port)
) WITHOUT ROWID;
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
CREATE TRIGGER flows_minute_contested_late_insert AFTER INSERT ON flows_minute
WHEN NEW.contested <> 0 AND NEW.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
BEGIN
    INSERT INTO contested_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.node, NEW.minute_ms - (NEW.minute_ms % 3600000), NEW.pid, NEW.process, NEW.direction, NEW.country, NEW.asn,
           NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.remote_address,
           NEW.remote_port, NEW.org, NEW.geo_source, NEW.bytes_sent, NEW.bytes_received,
           NEW.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes, NEW.unmeasured_flows
    WHERE true
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
    INSERT INTO contested_day (node, day_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.node, NEW.minute_ms - (NEW.minute_ms % 86400000), NEW.pid, NEW.process, NEW.direction, NEW.country, NEW.asn,
           NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.remote_address,
           NEW.remote_port, NEW.org, NEW.geo_source, NEW.bytes_sent, NEW.bytes_received,
           NEW.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes, NEW.unmeasured_flows
    WHERE NEW.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
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
-- A minute row merged with a later flow (same key): its old sums leave the contested rows
-- they were in (when it was contested), its new ones join those of its new verdict (when it is).
CREATE TRIGGER flows_minute_contested_late_update AFTER UPDATE ON flows_minute
WHEN (OLD.contested <> 0 OR NEW.contested <> 0) AND OLD.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
BEGIN
    UPDATE contested_hour SET
        bytes_sent = bytes_sent - OLD.bytes_sent,
        bytes_received = bytes_received - OLD.bytes_received,
        connections = connections - OLD.connections,
        conntrack_bytes = conntrack_bytes - OLD.conntrack_bytes,
        unmeasured_flows = unmeasured_flows - OLD.unmeasured_flows
    WHERE OLD.contested <> 0 AND hour_ms = OLD.minute_ms - (OLD.minute_ms % 3600000) AND node = OLD.node AND pid = OLD.pid
      AND process = OLD.process AND direction = OLD.direction AND country = OLD.country
      AND asn = OLD.asn AND answers = OLD.answers AND contested = OLD.contested
      AND operator_country = OLD.operator_country AND physics = OLD.physics
      AND remote_address = OLD.remote_address AND remote_port = OLD.remote_port;
    UPDATE contested_day SET
        bytes_sent = bytes_sent - OLD.bytes_sent,
        bytes_received = bytes_received - OLD.bytes_received,
        connections = connections - OLD.connections,
        conntrack_bytes = conntrack_bytes - OLD.conntrack_bytes,
        unmeasured_flows = unmeasured_flows - OLD.unmeasured_flows
    WHERE OLD.contested <> 0 AND OLD.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily') AND day_ms = OLD.minute_ms - (OLD.minute_ms % 86400000) AND node = OLD.node AND pid = OLD.pid
      AND process = OLD.process AND direction = OLD.direction AND country = OLD.country
      AND asn = OLD.asn AND answers = OLD.answers AND contested = OLD.contested
      AND operator_country = OLD.operator_country AND physics = OLD.physics
      AND remote_address = OLD.remote_address AND remote_port = OLD.remote_port;
    INSERT INTO contested_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.node, NEW.minute_ms - (NEW.minute_ms % 3600000), NEW.pid, NEW.process, NEW.direction, NEW.country, NEW.asn,
           NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.remote_address,
           NEW.remote_port, NEW.org, NEW.geo_source, NEW.bytes_sent, NEW.bytes_received,
           NEW.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes, NEW.unmeasured_flows
    WHERE NEW.contested <> 0
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
    INSERT INTO contested_day (node, day_ms, pid, process, direction, country, asn, answers, contested, operator_country, physics, remote_address, remote_port, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    SELECT NEW.node, NEW.minute_ms - (NEW.minute_ms % 86400000), NEW.pid, NEW.process, NEW.direction, NEW.country, NEW.asn,
           NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.remote_address,
           NEW.remote_port, NEW.org, NEW.geo_source, NEW.bytes_sent, NEW.bytes_received,
           NEW.connections, NEW.min_rtt_us, NEW.distance_km, NEW.limit_km,
           NEW.conntrack_bytes, NEW.unmeasured_flows
    WHERE NEW.contested <> 0 AND NEW.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
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
