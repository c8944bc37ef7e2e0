-- 003_accounts.sql
--
-- Accounts, identities and counter repair. Additions only: no AppView table or column changes.

-- The order keys ("<event time>#<seq>") of the newest identity and account event applied per
-- did, so that a replayed or late event never overwrites a newer handle or status, and the
-- handle that identity event names (claim; null for none or a deleted account). actor.handle
-- is a function of the claims: each handle goes to its newest claimant, whatever the order.
CREATE TABLE IF NOT EXISTS account_state (
    did             varchar NOT NULL,
    "handleKey"     varchar,
    "statusKey"     varchar,
    claim           varchar,
    CONSTRAINT account_state_pkey PRIMARY KEY (did)
);
CREATE INDEX IF NOT EXISTS account_state_claim_idx ON account_state (claim, "handleKey")
    WHERE claim IS NOT NULL;

-- One row per deleted account: the event time of its newest deletion. A record event of that
-- account not newer than "deletedAt" is applied as a delete (guarantee 3). pending = true until
-- the account's records indexed before the deletion have all been removed, chunk by chunk.
CREATE TABLE IF NOT EXISTS account_fence (
    did             varchar NOT NULL,
    "deletedAt"     varchar NOT NULL,
    pending         boolean NOT NULL,
    CONSTRAINT account_fence_pkey PRIMARY KEY (did)
);
CREATE INDEX IF NOT EXISTS account_fence_pending_idx ON account_fence (did) WHERE pending;

-- An account's records in uri order, for deletions in bounded chunks (replaces the did index).
CREATE INDEX IF NOT EXISTS record_state_did_uri_idx ON record_state (did, uri);
DROP INDEX IF EXISTS record_state_did_idx;

-- Counter keys to check with `indexer reconcile --dirty`: touched by an account deletion or a
-- duplicate promotion. kind is the aggregate table (post_agg, profile_agg), key its key.
CREATE TABLE IF NOT EXISTS dirty_counter (
    kind            varchar NOT NULL,
    key             varchar NOT NULL,
    CONSTRAINT dirty_counter_pkey PRIMARY KEY (kind, key)
);

-- The deletion fences of a batch's dids, read in one round trip after the calling transaction
-- has an id: a deletion that commits after this read then waits for the transaction (see
-- indexer/deletion.py). A VOLATILE function takes a fresh snapshot per statement, so the read
-- below sees the database as of after the id was assigned.
CREATE OR REPLACE FUNCTION indexer_account_fences(dids varchar[])
RETURNS TABLE (did varchar, "deletedAt" varchar)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN QUERY SELECT f.did, f."deletedAt" FROM account_fence f WHERE f.did = ANY(dids);
END
$$;
