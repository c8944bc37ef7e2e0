-- 001_appview_schema.sql
--
-- The Bluesky AppView data-plane schema: every table, index and materialized view that the
-- AppView's own readers expect, with the same names, column names (quoted camelCase), types,
-- nullability, defaults, generated columns, keys and indexes.
--
-- Conventions of that schema, kept here on purpose:
--   * timestamps are ISO-8601 strings in varchar columns ("createdAt", "indexedAt", ...);
--   * "sortAt" is least("createdAt", "indexedAt"), generated and stored, on record tables;
--   * counters live in post_agg / profile_agg as bigint with default 0.
--
-- Runs inside one transaction; no CONCURRENTLY. Our own additions come in later migrations.

CREATE EXTENSION IF NOT EXISTS pg_trgm;


-- ---------------------------------------------------------------------------------------------
-- Actors: identity, handle, repo sync state, per-actor settings
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS actor (
    did                             varchar NOT NULL,
    handle                          varchar,
    "indexedAt"                     varchar NOT NULL,
    "takedownRef"                   varchar,
    "upstreamStatus"                varchar,
    "trustedVerifier"               boolean NOT NULL DEFAULT false,
    "ageAssuranceStatus"            text,
    "ageAssuranceLastInitiatedAt"   varchar,
    "ageAssuranceAccess"            text,
    "ageAssuranceCountryCode"       text,
    "ageAssuranceRegionCode"        text,
    CONSTRAINT actor_pkey PRIMARY KEY (did),
    CONSTRAINT actor_handle_key UNIQUE (handle)
);
CREATE INDEX IF NOT EXISTS actor_handle_tgrm_idx ON actor USING gist (handle gist_trgm_ops);

CREATE TABLE IF NOT EXISTS actor_sync (
    did             varchar NOT NULL,
    "commitCid"     varchar NOT NULL,
    "repoRev"       varchar,
    CONSTRAINT actor_sync_pkey PRIMARY KEY (did)
);

CREATE TABLE IF NOT EXISTS actor_state (
    did                         varchar NOT NULL,
    "lastSeenNotifs"            varchar NOT NULL,
    "priorityNotifs"            boolean NOT NULL DEFAULT false,
    "lastSeenPriorityNotifs"    varchar,
    CONSTRAINT actor_state_pkey PRIMARY KEY (did)
);

CREATE TABLE IF NOT EXISTS did_cache (
    did             varchar NOT NULL,
    doc             jsonb NOT NULL,
    "updatedAt"     bigint NOT NULL,
    CONSTRAINT did_cache_pkey PRIMARY KEY (did)
);

CREATE TABLE IF NOT EXISTS private_data (
    "actorDid"      varchar NOT NULL,
    namespace       varchar NOT NULL,
    key             varchar NOT NULL,
    payload         text NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "updatedAt"     varchar NOT NULL,
    CONSTRAINT private_data_pkey PRIMARY KEY ("actorDid", namespace, key)
);

CREATE TABLE IF NOT EXISTS notification_push_token (
    did             varchar NOT NULL,
    platform        varchar NOT NULL,
    token           varchar NOT NULL,
    "appId"         varchar NOT NULL,
    CONSTRAINT notification_push_token_pkey PRIMARY KEY (did, token)
);


-- ---------------------------------------------------------------------------------------------
-- Raw records: every indexed record's JSON, and records recognised as duplicates
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS record (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    did             varchar NOT NULL,
    json            text NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "takedownRef"   varchar,
    tags            jsonb,
    CONSTRAINT record_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS record_did_idx ON record (did);

CREATE TABLE IF NOT EXISTS duplicate_record (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    "duplicateOf"   varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    CONSTRAINT duplicate_record_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS duplicate_record_duplicate_of_idx ON duplicate_record ("duplicateOf");

CREATE TABLE IF NOT EXISTS blob_takedown (
    did             varchar NOT NULL,
    cid             varchar NOT NULL,
    "takedownRef"   varchar NOT NULL,
    CONSTRAINT blob_takedown_pkey PRIMARY KEY (did, cid)
);


-- ---------------------------------------------------------------------------------------------
-- Posts (app.bsky.feed.post) and their embeds
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS post (
    uri                         varchar NOT NULL,
    cid                         varchar NOT NULL,
    creator                     varchar NOT NULL,
    text                        varchar NOT NULL,
    "replyRoot"                 varchar,
    "replyRootCid"              varchar,
    "replyParent"               varchar,
    "replyParentCid"            varchar,
    "createdAt"                 varchar NOT NULL,
    "indexedAt"                 varchar NOT NULL,
    "sortAt"                    varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    langs                       jsonb,
    "invalidReplyRoot"          boolean,
    "violatesThreadGate"        boolean,
    tags                        jsonb,
    "violatesEmbeddingRules"    boolean,
    "hasThreadGate"             boolean,
    "hasPostGate"               boolean,
    CONSTRAINT post_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS post_creator_cursor_idx ON post (creator, "sortAt", cid);
CREATE INDEX IF NOT EXISTS post_order_by_idx ON post ("sortAt", cid);
CREATE INDEX IF NOT EXISTS post_replyparent_idx ON post ("replyParent") INCLUDE (uri);

CREATE TABLE IF NOT EXISTS post_embed_image (
    "postUri"       varchar NOT NULL,
    "position"      varchar NOT NULL,
    "imageCid"      varchar NOT NULL,
    alt             varchar NOT NULL,
    CONSTRAINT post_embed_image_pkey PRIMARY KEY ("postUri", "position")
);

CREATE TABLE IF NOT EXISTS post_embed_external (
    "postUri"       varchar NOT NULL,
    uri             varchar NOT NULL,
    title           varchar NOT NULL,
    description     varchar NOT NULL,
    "thumbCid"      varchar,
    CONSTRAINT post_embed_external_pkey PRIMARY KEY ("postUri")
);

CREATE TABLE IF NOT EXISTS post_embed_record (
    "postUri"       varchar NOT NULL,
    "embedUri"      varchar NOT NULL,
    "embedCid"      varchar NOT NULL,
    CONSTRAINT post_embed_record_pkey PRIMARY KEY ("postUri", "embedUri")
);

CREATE TABLE IF NOT EXISTS post_embed_video (
    "postUri"       varchar NOT NULL,
    "videoCid"      varchar NOT NULL,
    alt             varchar,
    CONSTRAINT post_embed_video_pkey PRIMARY KEY ("postUri")
);

-- Quote posts: one row per post that embeds another post.
CREATE TABLE IF NOT EXISTS quote (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    subject         varchar NOT NULL,
    "subjectCid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT quote_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS quote_subject_cursor_idx ON quote (subject, "sortAt", cid);

-- Thread gates (app.bsky.feed.threadgate) and post gates (app.bsky.feed.postgate).
CREATE TABLE IF NOT EXISTS thread_gate (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "postUri"       varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    CONSTRAINT thread_gate_pkey PRIMARY KEY (uri),
    CONSTRAINT "thread_gate_postUri_key" UNIQUE ("postUri")
);

CREATE TABLE IF NOT EXISTS post_gate (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "postUri"       varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    CONSTRAINT post_gate_pkey PRIMARY KEY (uri),
    CONSTRAINT "post_gate_postUri_key" UNIQUE ("postUri")
);


-- ---------------------------------------------------------------------------------------------
-- Likes and reposts (app.bsky.feed.like, app.bsky.feed.repost)
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS "like" (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    subject         varchar NOT NULL,
    "subjectCid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    via             varchar,
    "viaCid"        varchar,
    CONSTRAINT like_pkey PRIMARY KEY (uri),
    CONSTRAINT like_unique_subject UNIQUE (subject, creator)
);
CREATE INDEX IF NOT EXISTS like_creator_cursor_idx ON "like" (creator, "sortAt", cid);

CREATE TABLE IF NOT EXISTS repost (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    subject         varchar NOT NULL,
    "subjectCid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    via             varchar,
    "viaCid"        varchar,
    CONSTRAINT repost_pkey PRIMARY KEY (uri),
    CONSTRAINT repost_unique_subject UNIQUE (creator, subject)
);
CREATE INDEX IF NOT EXISTS repost_order_by_idx ON repost ("sortAt", cid);
CREATE INDEX IF NOT EXISTS repost_subject_idx ON repost (subject);

-- Home-timeline items: posts and reposts, keyed by the post or repost uri.
CREATE TABLE IF NOT EXISTS feed_item (
    uri                 varchar NOT NULL,
    cid                 varchar NOT NULL,
    type                varchar NOT NULL,
    "postUri"           varchar NOT NULL,
    "originatorDid"     varchar NOT NULL,
    "sortAt"            varchar NOT NULL,
    CONSTRAINT feed_item_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS feed_item_cursor_idx ON feed_item ("sortAt", cid);
CREATE INDEX IF NOT EXISTS feed_item_originator_cursor_idx ON feed_item ("originatorDid", "sortAt", cid);
CREATE INDEX IF NOT EXISTS feed_item_post_uri_idx ON feed_item ("postUri");


-- ---------------------------------------------------------------------------------------------
-- Social graph: follows, blocks, mutes (app.bsky.graph.follow, app.bsky.graph.block)
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS follow (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "subjectDid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT follow_pkey PRIMARY KEY (uri),
    CONSTRAINT follow_unique_subject UNIQUE (creator, "subjectDid")
);
CREATE INDEX IF NOT EXISTS follow_creator_cursor_idx ON follow (creator, "sortAt", cid);
CREATE INDEX IF NOT EXISTS follow_subject_cursor_idx ON follow ("subjectDid", "sortAt", cid);

CREATE TABLE IF NOT EXISTS actor_block (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "subjectDid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT actor_block_pkey PRIMARY KEY (uri),
    CONSTRAINT actor_block_unique_subject UNIQUE (creator, "subjectDid")
);
CREATE INDEX IF NOT EXISTS actor_block_subjectdid_idx ON actor_block ("subjectDid");

-- Mutes are private state (not records): no uri, keyed by who mutes what.
CREATE TABLE IF NOT EXISTS mute (
    "subjectDid"    varchar NOT NULL,
    "mutedByDid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    CONSTRAINT mute_pkey PRIMARY KEY ("mutedByDid", "subjectDid")
);

CREATE TABLE IF NOT EXISTS list_mute (
    "listUri"       varchar NOT NULL,
    "mutedByDid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    CONSTRAINT list_mute_pkey PRIMARY KEY ("mutedByDid", "listUri")
);

CREATE TABLE IF NOT EXISTS thread_mute (
    "rootUri"       varchar NOT NULL,
    "mutedByDid"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    CONSTRAINT thread_mute_pkey PRIMARY KEY ("rootUri", "mutedByDid")
);


-- ---------------------------------------------------------------------------------------------
-- Lists (app.bsky.graph.list, listitem, listblock) and starter packs
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS list (
    uri                     varchar NOT NULL,
    cid                     varchar NOT NULL,
    creator                 varchar NOT NULL,
    name                    varchar NOT NULL,
    purpose                 varchar NOT NULL,
    description             varchar,
    "descriptionFacets"     varchar,
    "avatarCid"             varchar,
    "createdAt"             varchar NOT NULL,
    "indexedAt"             varchar NOT NULL,
    "sortAt"                varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT list_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS list_creator_idx ON list (creator);

CREATE TABLE IF NOT EXISTS list_item (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "subjectDid"    varchar NOT NULL,
    "listUri"       varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT list_item_pkey PRIMARY KEY (uri),
    CONSTRAINT list_item_unique_subject_in_list UNIQUE ("listUri", "subjectDid")
);
CREATE INDEX IF NOT EXISTS list_item_creator_idx ON list_item (creator);
CREATE INDEX IF NOT EXISTS list_item_subject_idx ON list_item ("subjectDid");

CREATE TABLE IF NOT EXISTS list_block (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "subjectUri"    varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT list_block_pkey PRIMARY KEY (uri),
    CONSTRAINT list_block_unique_subject UNIQUE (creator, "subjectUri")
);

CREATE TABLE IF NOT EXISTS starter_pack (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    name            varchar,
    CONSTRAINT starter_pack_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS starter_pack_creator_order_by_idx ON starter_pack (creator, "sortAt", cid);
CREATE INDEX IF NOT EXISTS starter_pack_name_tgrm_idx ON starter_pack USING gist (name gist_trgm_ops);


-- ---------------------------------------------------------------------------------------------
-- Profiles (app.bsky.actor.profile)
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS profile (
    uri                         varchar NOT NULL,
    cid                         varchar NOT NULL,
    creator                     varchar NOT NULL,
    "displayName"               varchar,
    description                 varchar,
    "avatarCid"                 varchar,
    "bannerCid"                 varchar,
    "indexedAt"                 varchar NOT NULL,
    "joinedViaStarterPackUri"   varchar,
    "createdAt"                 varchar NOT NULL,
    "pinnedPost"                varchar,
    "pinnedPostCid"             varchar,
    CONSTRAINT profile_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS profile_creator_idx ON profile (creator);
CREATE INDEX IF NOT EXISTS profile_display_name_tgrm_idx ON profile USING gist ("displayName" gist_trgm_ops);
CREATE INDEX IF NOT EXISTS profile_starter_pack_joined_idx ON profile ("joinedViaStarterPackUri", "createdAt");


-- ---------------------------------------------------------------------------------------------
-- Feed generators, labelers, verifications
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS feed_generator (
    uri                     varchar NOT NULL,
    cid                     varchar NOT NULL,
    creator                 varchar NOT NULL,
    "feedDid"               varchar NOT NULL,
    "displayName"           varchar,
    description             varchar,
    "descriptionFacets"     varchar,
    "avatarCid"             varchar,
    "createdAt"             varchar NOT NULL,
    "indexedAt"             varchar NOT NULL,
    "sortAt"                varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT feed_generator_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS feed_generator_creator_index ON feed_generator (creator);

CREATE TABLE IF NOT EXISTS labeler (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    creator         varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortAt"        varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT labeler_pkey PRIMARY KEY (uri)
);
CREATE INDEX IF NOT EXISTS labeler_order_by_idx ON labeler ("sortAt", cid);

-- Note: this table's generated column is "sortedAt", not "sortAt".
CREATE TABLE IF NOT EXISTS verification (
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    rkey            varchar NOT NULL,
    creator         varchar NOT NULL,
    subject         varchar NOT NULL,
    handle          varchar NOT NULL,
    "displayName"   varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    "sortedAt"      varchar GENERATED ALWAYS AS (least("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT verification_pkey PRIMARY KEY (uri),
    CONSTRAINT verification_unique_subject_creator UNIQUE (subject, creator)
);


-- ---------------------------------------------------------------------------------------------
-- Labels
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS label (
    src             varchar NOT NULL,
    uri             varchar NOT NULL,
    cid             varchar NOT NULL,
    val             varchar NOT NULL,
    neg             boolean NOT NULL,
    cts             varchar NOT NULL,
    exp             varchar,
    CONSTRAINT label_pkey PRIMARY KEY (src, uri, cid, val)
);
CREATE INDEX IF NOT EXISTS label_cts_idx ON label (cts);
CREATE INDEX IF NOT EXISTS label_uri_index ON label (uri);


-- ---------------------------------------------------------------------------------------------
-- Notifications and activity subscriptions
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS notification (
    id                  bigserial NOT NULL,
    did                 varchar NOT NULL,
    "recordUri"         varchar NOT NULL,
    "recordCid"         varchar NOT NULL,
    author              varchar NOT NULL,
    reason              varchar NOT NULL,
    "reasonSubject"     varchar,
    "sortAt"            varchar NOT NULL,
    CONSTRAINT notification_pkey PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS notification_author_idx ON notification (author);
CREATE INDEX IF NOT EXISTS notification_did_sortat_idx ON notification (did, "sortAt");
CREATE INDEX IF NOT EXISTS notification_record_idx ON notification ("recordUri");

CREATE TABLE IF NOT EXISTS activity_subscription (
    creator         varchar NOT NULL,
    "subjectDid"    varchar NOT NULL,
    key             varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    post            boolean NOT NULL,
    reply           boolean NOT NULL,
    CONSTRAINT activity_subscription_pkey PRIMARY KEY (creator, key),
    CONSTRAINT activity_subscription_unique_creator_subject_did UNIQUE (creator, "subjectDid")
);


-- ---------------------------------------------------------------------------------------------
-- Bookmarks and drafts (private, per-actor)
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS bookmark (
    creator         varchar NOT NULL,
    key             varchar NOT NULL,
    "subjectUri"    varchar NOT NULL,
    "subjectCid"    varchar NOT NULL,
    "indexedAt"     varchar NOT NULL,
    CONSTRAINT bookmark_pkey PRIMARY KEY (creator, key),
    CONSTRAINT bookmark_unique_uri_creator UNIQUE ("subjectUri", creator)
);

CREATE TABLE IF NOT EXISTS draft (
    creator         varchar NOT NULL,
    key             varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    "updatedAt"     varchar NOT NULL,
    payload         text NOT NULL,
    CONSTRAINT draft_pkey PRIMARY KEY (creator, key)
);
CREATE INDEX IF NOT EXISTS draft_creator_updated_at_key_idx ON draft (creator, "updatedAt", key);


-- ---------------------------------------------------------------------------------------------
-- Aggregates: the counters the indexer keeps exact
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS post_agg (
    uri                 varchar NOT NULL,
    "likeCount"         bigint NOT NULL DEFAULT 0,
    "replyCount"        bigint NOT NULL DEFAULT 0,
    "repostCount"       bigint NOT NULL DEFAULT 0,
    "quoteCount"        bigint NOT NULL DEFAULT 0,
    "bookmarkCount"     bigint NOT NULL DEFAULT 0,
    CONSTRAINT post_agg_pkey PRIMARY KEY (uri)
);

CREATE TABLE IF NOT EXISTS profile_agg (
    did                 varchar NOT NULL,
    "followersCount"    bigint NOT NULL DEFAULT 0,
    "followsCount"      bigint NOT NULL DEFAULT 0,
    "postsCount"        bigint NOT NULL DEFAULT 0,
    CONSTRAINT profile_agg_pkey PRIMARY KEY (did)
);


-- ---------------------------------------------------------------------------------------------
-- Suggestions and subscription cursors
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS suggested_follow (
    did             varchar NOT NULL,
    "order"         integer NOT NULL,
    CONSTRAINT suggested_follow_pkey PRIMARY KEY (did)
);

CREATE TABLE IF NOT EXISTS suggested_feed (
    uri             varchar NOT NULL,
    "order"         integer NOT NULL,
    CONSTRAINT suggested_feed_pkey PRIMARY KEY (uri)
);

CREATE TABLE IF NOT EXISTS tagged_suggestion (
    tag             varchar NOT NULL,
    subject         varchar NOT NULL,
    "subjectType"   varchar NOT NULL,
    CONSTRAINT tagged_suggestion_pkey PRIMARY KEY (tag, subject)
);

CREATE TABLE IF NOT EXISTS subscription (
    service         varchar NOT NULL,
    method          varchar NOT NULL,
    state           varchar NOT NULL,
    CONSTRAINT subscription_pkey PRIMARY KEY (service, method)
);


-- ---------------------------------------------------------------------------------------------
-- Moderation (legacy tables, still part of the schema)
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS moderation_action (
    id                  serial NOT NULL,
    action              varchar NOT NULL,
    "subjectType"       varchar NOT NULL,
    "subjectDid"        varchar NOT NULL,
    "subjectUri"        varchar,
    "subjectCid"        varchar,
    reason              text NOT NULL,
    "createdAt"         varchar NOT NULL,
    "createdBy"         varchar NOT NULL,
    "reversedAt"        varchar,
    "reversedBy"        varchar,
    "reversedReason"    text,
    "createLabelVals"   varchar,
    "negateLabelVals"   varchar,
    "durationInHours"   integer,
    "expiresAt"         varchar,
    CONSTRAINT moderation_action_pkey PRIMARY KEY (id)
);

CREATE TABLE IF NOT EXISTS moderation_action_subject_blob (
    "actionId"      integer NOT NULL,
    cid             varchar NOT NULL,
    CONSTRAINT moderation_action_subject_blob_pkey PRIMARY KEY ("actionId", cid),
    CONSTRAINT "moderation_action_subject_blob_actionId_fkey"
        FOREIGN KEY ("actionId") REFERENCES moderation_action (id)
);
CREATE INDEX IF NOT EXISTS moderation_action_subject_blob_cid_idx ON moderation_action_subject_blob (cid);

CREATE TABLE IF NOT EXISTS moderation_report (
    id                  serial NOT NULL,
    "subjectType"       varchar NOT NULL,
    "subjectDid"        varchar NOT NULL,
    "subjectUri"        varchar,
    "subjectCid"        varchar,
    "reasonType"        varchar NOT NULL,
    reason              text,
    "reportedByDid"     varchar NOT NULL,
    "createdAt"         varchar NOT NULL,
    CONSTRAINT moderation_report_pkey PRIMARY KEY (id)
);

CREATE TABLE IF NOT EXISTS moderation_report_resolution (
    "reportId"      integer NOT NULL,
    "actionId"      integer NOT NULL,
    "createdBy"     varchar NOT NULL,
    "createdAt"     varchar NOT NULL,
    CONSTRAINT moderation_report_resolution_pkey PRIMARY KEY ("reportId", "actionId"),
    CONSTRAINT "moderation_report_resolution_reportId_fkey"
        FOREIGN KEY ("reportId") REFERENCES moderation_report (id),
    CONSTRAINT "moderation_report_resolution_actionId_fkey"
        FOREIGN KEY ("actionId") REFERENCES moderation_action (id)
);
CREATE INDEX IF NOT EXISTS moderation_report_resolution_action_id_idx ON moderation_report_resolution ("actionId");

CREATE TABLE IF NOT EXISTS moderation_event (
    id                  serial NOT NULL,
    action              varchar NOT NULL,
    "subjectType"       varchar NOT NULL,
    "subjectDid"        varchar NOT NULL,
    "subjectUri"        varchar,
    "subjectCid"        varchar,
    comment             text,
    meta                jsonb,
    "createdAt"         varchar NOT NULL,
    "createdBy"         varchar NOT NULL,
    "reversedAt"        varchar,
    "reversedBy"        varchar,
    "durationInHours"   integer,
    "expiresAt"         varchar,
    "reversedReason"    text,
    "createLabelVals"   varchar,
    "negateLabelVals"   varchar,
    "legacyRefId"       integer,
    CONSTRAINT moderation_event_pkey PRIMARY KEY (id)
);

CREATE TABLE IF NOT EXISTS moderation_subject_status (
    id                  serial NOT NULL,
    did                 varchar NOT NULL,
    "recordPath"        varchar NOT NULL DEFAULT '',
    "blobCids"          jsonb,
    "recordCid"         varchar,
    "reviewState"       varchar NOT NULL,
    comment             varchar,
    "muteUntil"         varchar,
    "lastReviewedAt"    varchar,
    "lastReviewedBy"    varchar,
    "lastReportedAt"    varchar,
    takendown           boolean NOT NULL DEFAULT false,
    "suspendUntil"      varchar,
    "createdAt"         varchar NOT NULL,
    "updatedAt"         varchar NOT NULL,
    CONSTRAINT moderation_subject_status_pkey PRIMARY KEY (id),
    CONSTRAINT moderation_status_unique_idx UNIQUE (did, "recordPath")
);
CREATE INDEX IF NOT EXISTS moderation_subject_status_blob_cids_idx ON moderation_subject_status USING gin ("blobCids");


-- ---------------------------------------------------------------------------------------------
-- "What's hot": tunables and the materialized view built from them
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS view_param (
    name            varchar NOT NULL,
    value           varchar,
    CONSTRAINT view_param_pkey PRIMARY KEY (name)
);

INSERT INTO view_param (name, value) VALUES
    ('whats_hot_like_threshold', '2'),
    ('whats_hot_interval', '1day')
ON CONFLICT (name) DO NOTHING;

-- Score: likes decayed by age in hours, (likes / (hours + 2) ^ 1.8) * 1e6, over top-level posts
-- indexed within whats_hot_interval that have more than whats_hot_like_threshold likes.
CREATE MATERIALIZED VIEW IF NOT EXISTS algo_whats_hot_view AS
SELECT
    post.uri,
    post.cid,
    round(
        1000000 * (
            post_agg."likeCount"::numeric
            / ((extract(epoch FROM age(now(), post."indexedAt"::timestamp)) / 3600 + 2) ^ 1.8)
        )
    ) AS score
FROM post
JOIN post_agg ON post_agg.uri = post.uri
WHERE post."indexedAt" > (
        SELECT to_char(now() - value::interval, 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS val
        FROM view_param
        WHERE name = 'whats_hot_interval'
    )
  AND post."replyParent" IS NULL
  AND post_agg."likeCount" > (
        SELECT value::integer AS val
        FROM view_param
        WHERE name = 'whats_hot_like_threshold'
    );

CREATE UNIQUE INDEX IF NOT EXISTS algo_whats_hot_view_uri_idx ON algo_whats_hot_view (uri);
CREATE INDEX IF NOT EXISTS algo_whats_hot_view_cursor_idx ON algo_whats_hot_view (score, cid);
