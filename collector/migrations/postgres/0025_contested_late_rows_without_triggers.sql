-- Issue 14, seventh round: a late contested flow-minute row (of a minute already rolled up
-- into hours) reaches its `contested_hour` row, and its `contested_day` row when its day is
-- rolled up, through the deriver's own set-based statements in its late-row path
-- (collector/src/store/postgres/ingest.rs, LATE_CONTESTED_OUT / LATE_CONTESTED_IN), only for
-- late rows, under the rollup's advisory lock (shared) as the trigger took it. The statement
-- triggers of 0024 filled both transition tables (every row written, old and new) and scanned
-- them for every aggregate write.
DROP TRIGGER flows_minute_contested_late_insert ON flows_minute;
DROP TRIGGER flows_minute_contested_late_update ON flows_minute;
DROP FUNCTION sov_flows_minute_contested_late();
