-- 002_indexer_state.sql
--
-- Our additions to the AppView schema. Additions only: no AppView table or column is renamed
-- or changed, so the AppView's readers keep working unchanged.

-- The repo revision (a TID string) at which this record version was written. TIDs sort
-- lexicographically, so plain string comparison orders revisions. '' = unknown (older than any).
ALTER TABLE record ADD COLUMN IF NOT EXISTS rev varchar NOT NULL DEFAULT '';

-- Per-record rev guard: one row per record uri ever seen, holding the newest rev applied to it.
-- live = false is a tombstone (the record was deleted at that rev), so a late create or update
-- with an older rev, replayed by another replica, is recognised and skipped.
CREATE TABLE IF NOT EXISTS record_state (
    uri             varchar NOT NULL,
    did             varchar NOT NULL,
    rev             varchar NOT NULL,
    live            boolean NOT NULL,
    "updatedAt"     varchar NOT NULL,
    CONSTRAINT record_state_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS record_state_did_idx ON record_state (did);
