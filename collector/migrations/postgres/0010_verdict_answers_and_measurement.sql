-- Issue 16: every source's answer with each flow's verdict, the speed-of-light check, the
-- operator's country, and how the bytes were measured.
ALTER TABLE flows_minute ADD COLUMN answers TEXT NOT NULL DEFAULT '';
ALTER TABLE flows_minute ADD COLUMN contested BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flows_minute ADD COLUMN operator_country TEXT NOT NULL DEFAULT '';
ALTER TABLE flows_minute ADD COLUMN physics TEXT NOT NULL DEFAULT '';
ALTER TABLE flows_minute ADD COLUMN distance_km BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flows_minute ADD COLUMN limit_km BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flows_minute ADD COLUMN conntrack_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flows_minute ADD COLUMN unmeasured_flows BIGINT NOT NULL DEFAULT 0;
