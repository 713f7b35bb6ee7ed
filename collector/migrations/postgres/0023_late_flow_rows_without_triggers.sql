-- Issue 14, fourth round: a flow-minute row of a minute already rolled up into hours (a late
-- report) reaches its hour row through the deriver's own statements (collector/src/store/
-- minutes.rs, LATE_HOUR_KEY), only for such rows, under the same shared advisory lock the
-- trigger took. The statement triggers filled both transition tables (every row written,
-- old and new) and scanned them for every aggregate write.
DROP TRIGGER flows_minute_late_insert ON flows_minute;
DROP TRIGGER flows_minute_late_update ON flows_minute;
DROP FUNCTION sov_flows_minute_late();
