-- Issue 14, fourth round: a flow-minute row of a minute already rolled up into hours (a late
-- report) reaches its hour row through the deriver's own statements (collector/src/store/
-- minutes.rs, LATE_HOUR_KEY), only for such rows. The row triggers did the same for every
-- aggregate write, and their cost (the WHEN subquery per row and trigger program) was 20-35 %
-- of that write (PERFORMANCE.md 8f).
DROP TRIGGER flows_minute_late_insert;
DROP TRIGGER flows_minute_late_update;
