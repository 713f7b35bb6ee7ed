-- Issue 14, queries at volume, second level: day rows. At country scale even hour rows are
-- too many for a month of a fleet (about 1,240 flow-hour rows per node-day against about 50
-- distinct (process, destination country, ASN, verdict) keys a node uses in a day), so whole
-- days of hour rows are summed once more into `flows_day` and `gpu_usage_day`, with the same
-- keys as the hour rows and the day first. `rollup_state` 'daily' is the end of the rolled-up
-- days (a day boundary, never past the hourly rollup's end). An hour row written or changed
-- later for a day already rolled up (a late report, through the hourly triggers of 0016) is
-- carried into its day row by the triggers below, in the same transaction; they fire on
-- hour-row writes only (the rollup and late reports), never on the derive path itself.
INSERT INTO rollup_state (name, up_to_ms) VALUES ('daily', 0);
CREATE TABLE flows_day (
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
                 operator_country, physics)
) WITHOUT ROWID;
CREATE TABLE gpu_usage_day (
    node          TEXT NOT NULL,
    day_ms        INTEGER NOT NULL,
    pid           INTEGER NOT NULL,
    process_name  TEXT NOT NULL,
    pod_namespace TEXT NOT NULL,
    gpu_seconds   REAL NOT NULL,
    PRIMARY KEY (day_ms, node, pid, process_name, pod_namespace)
) WITHOUT ROWID;
CREATE TRIGGER flows_hour_late_insert AFTER INSERT ON flows_hour
WHEN NEW.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    INSERT INTO flows_day (node, day_ms, pid, process, direction, country, asn, answers, contested,
                           operator_country, physics, org, geo_source, bytes_sent, bytes_received,
                           connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.node, NEW.hour_ms - (NEW.hour_ms % 86400000), NEW.pid, NEW.process, NEW.direction,
            NEW.country, NEW.asn, NEW.answers, NEW.contested, NEW.operator_country, NEW.physics, NEW.org,
            NEW.geo_source, NEW.bytes_sent, NEW.bytes_received, NEW.connections, NEW.min_rtt_us,
            NEW.distance_km, NEW.limit_km, NEW.conntrack_bytes, NEW.unmeasured_flows)
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
-- An hour row's key never changes: its day row takes the difference of the sums.
CREATE TRIGGER flows_hour_late_update AFTER UPDATE ON flows_hour
WHEN OLD.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    UPDATE flows_day SET
        bytes_sent = bytes_sent + NEW.bytes_sent - OLD.bytes_sent,
        bytes_received = bytes_received + NEW.bytes_received - OLD.bytes_received,
        connections = connections + NEW.connections - OLD.connections,
        conntrack_bytes = conntrack_bytes + NEW.conntrack_bytes - OLD.conntrack_bytes,
        unmeasured_flows = unmeasured_flows + NEW.unmeasured_flows - OLD.unmeasured_flows,
        min_rtt_us = CASE WHEN min_rtt_us = 0 THEN NEW.min_rtt_us
                          WHEN NEW.min_rtt_us = 0 THEN min_rtt_us
                          ELSE min(min_rtt_us, NEW.min_rtt_us) END,
        limit_km = CASE WHEN limit_km = 0 THEN NEW.limit_km
                        WHEN NEW.limit_km = 0 THEN limit_km
                        ELSE min(limit_km, NEW.limit_km) END,
        distance_km = max(distance_km, NEW.distance_km),
        org = max(org, NEW.org),
        geo_source = max(geo_source, NEW.geo_source)
    WHERE day_ms = OLD.hour_ms - (OLD.hour_ms % 86400000) AND node = OLD.node AND pid = OLD.pid
      AND process = OLD.process AND direction = OLD.direction AND country = OLD.country
      AND asn = OLD.asn AND answers = OLD.answers AND contested = OLD.contested
      AND operator_country = OLD.operator_country AND physics = OLD.physics;
END;
CREATE TRIGGER gpu_usage_hour_late_insert AFTER INSERT ON gpu_usage_hour
WHEN NEW.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    INSERT INTO gpu_usage_day (node, day_ms, pid, process_name, pod_namespace, gpu_seconds)
    VALUES (NEW.node, NEW.hour_ms - (NEW.hour_ms % 86400000), NEW.pid, NEW.process_name,
            NEW.pod_namespace, NEW.gpu_seconds)
    ON CONFLICT DO UPDATE SET gpu_seconds = gpu_seconds + excluded.gpu_seconds;
END;
CREATE TRIGGER gpu_usage_hour_late_update AFTER UPDATE ON gpu_usage_hour
WHEN OLD.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
BEGIN
    UPDATE gpu_usage_day SET gpu_seconds = gpu_seconds + NEW.gpu_seconds - OLD.gpu_seconds
    WHERE day_ms = OLD.hour_ms - (OLD.hour_ms % 86400000) AND node = OLD.node AND pid = OLD.pid
      AND process_name = OLD.process_name AND pod_namespace = OLD.pod_namespace;
END;
