-- 004_record_state_live_before.sql
--
-- The rev guard decides and applies in one statement (INSERT ... ON CONFLICT DO UPDATE on
-- record_state). What a change does to the typed rows depends on whether the record was live
-- before it, and RETURNING shows only the new row: the update keeps the old `live` here, read
-- from the row it locked (the latest committed version), so the statement can return it.
-- NULL on a row never updated. Nullable with no default: adding it rewrites nothing.
ALTER TABLE record_state ADD COLUMN IF NOT EXISTS "liveBefore" boolean;
