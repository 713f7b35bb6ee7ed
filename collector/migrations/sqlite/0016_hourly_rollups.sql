-- Issue 14, queries at volume: hourly rollups of the minute rows the regulators' questions
-- read, so that a month or a year is answered from hours. `flows_hour` sums `flows_minute`
-- by (node, hour, process, direction, country, ASN) and the destination's verdict (answers,
-- contested, operator country, physics: what the policy counts by), without the address;
-- `gpu_usage_hour` sums `gpu_usage` by (node, hour, process, Kubernetes namespace). The
-- rollup copies: minute and raw rows stay for their own retention, so per-destination and
-- per-container questions keep their detail, and a range that starts or ends inside an hour
-- reads that hour's minutes. `rollup_state.up_to_ms` is the end of the rolled-up hours (an
-- hour boundary); rows derived later for an hour before it (a late report) are added to the
-- hour rows by the triggers below, in the transaction that writes them.
CREATE TABLE rollup_state (
    name     TEXT PRIMARY KEY,
    up_to_ms INTEGER NOT NULL
);
INSERT INTO rollup_state (name, up_to_ms) VALUES ('hourly', 0);
CREATE TABLE flows_hour (
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
                 operator_country, physics)
) WITHOUT ROWID;
CREATE TABLE gpu_usage_hour (
    node          TEXT NOT NULL,
    hour_ms       INTEGER NOT NULL,
    pid           INTEGER NOT NULL,
    process_name  TEXT NOT NULL,
    pod_namespace TEXT NOT NULL,
    gpu_seconds   REAL NOT NULL,
    PRIMARY KEY (hour_ms, node, pid, process_name, pod_namespace)
) WITHOUT ROWID;
CREATE TRIGGER flows_minute_late_insert AFTER INSERT ON flows_minute
WHEN NEW.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
BEGIN
    INSERT INTO flows_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested,
                            operator_country, physics, org, geo_source, bytes_sent, bytes_received,
                            connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.node, NEW.minute_ms - (NEW.minute_ms % 3600000), NEW.pid, NEW.process, NEW.direction,
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
-- A minute row merged with a later flow (same key): its old sums leave the hour row they
-- were in, its new ones join the hour row of its (possibly new) verdict.
CREATE TRIGGER flows_minute_late_update AFTER UPDATE ON flows_minute
WHEN OLD.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
BEGIN
    UPDATE flows_hour SET
        bytes_sent = bytes_sent - OLD.bytes_sent,
        bytes_received = bytes_received - OLD.bytes_received,
        connections = connections - OLD.connections,
        conntrack_bytes = conntrack_bytes - OLD.conntrack_bytes,
        unmeasured_flows = unmeasured_flows - OLD.unmeasured_flows
    WHERE hour_ms = OLD.minute_ms - (OLD.minute_ms % 3600000) AND node = OLD.node AND pid = OLD.pid
      AND process = OLD.process AND direction = OLD.direction AND country = OLD.country
      AND asn = OLD.asn AND answers = OLD.answers AND contested = OLD.contested
      AND operator_country = OLD.operator_country AND physics = OLD.physics;
    INSERT INTO flows_hour (node, hour_ms, pid, process, direction, country, asn, answers, contested,
                            operator_country, physics, org, geo_source, bytes_sent, bytes_received,
                            connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
    VALUES (NEW.node, NEW.minute_ms - (NEW.minute_ms % 3600000), NEW.pid, NEW.process, NEW.direction,
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
CREATE TRIGGER gpu_usage_late_insert AFTER INSERT ON gpu_usage
WHEN NEW.observed_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
BEGIN
    INSERT INTO gpu_usage_hour (node, hour_ms, pid, process_name, pod_namespace, gpu_seconds)
    VALUES (NEW.node, NEW.observed_ms - (NEW.observed_ms % 3600000), NEW.pid, NEW.process_name,
            COALESCE((SELECT c.pod_namespace FROM containers_minute c WHERE c.node = NEW.node
                        AND c.minute_ms = NEW.observed_ms - (NEW.observed_ms % 60000) AND c.pid = NEW.pid), ''),
            NEW.gpu_seconds)
    ON CONFLICT DO UPDATE SET gpu_seconds = gpu_seconds + excluded.gpu_seconds;
END;
-- The scorecard counts contested destinations from minute rows (hour rows keep no address):
-- without this index that read scans every minute row of the range; contested rows are
-- few, so the index costs the derive path little.
CREATE INDEX flows_minute_contested ON flows_minute (minute_ms) WHERE contested <> 0;
