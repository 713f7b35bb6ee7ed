-- Issue 14: the contested level's late rows without triggers. The trigger pair of 0023 on
-- `flows_minute` (a late contested minute row added to its `contested_hour` row, and to its
-- `contested_day` row when its day is rolled up too) was the only trigger left on that table,
-- and SQLite evaluated its `WHEN` (a subquery of `rollup_state`) for every minute row written,
-- late or not. The deriver now does those two steps itself in its late-row path, beside the
-- hour rows' (`store::minutes::ContestedChanges`), each contested row a batch touches written
-- once.
DROP TRIGGER flows_minute_contested_late_insert;
DROP TRIGGER flows_minute_contested_late_update;
