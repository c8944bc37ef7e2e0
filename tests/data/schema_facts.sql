-- Schema facts of one schema ($1 = schema name), one fact per row in column "fact", sorted.
-- tests/data/appview_schema.txt holds this query's output for the reference AppView schema;
-- every line of it must also come out of this query for our migrated schema (ours may have more).
--
--   relation   <name> table|materialized view
--   column     <table>.<column> <type> [not null] [generated: <expr>] [default: <expr>]
--   index      <table> <index> unique|nonunique <col[ opclass][ desc][ nulls first]>,...
--                  [include: <col>,...] [using: <method>] [where: <predicate>]
--   constraint <table> <name> primary key|unique|foreign key (<col>,...) [references <t>(<col>,...)]
--   sequence   <name> <type>
--
-- Names of the schema itself are stripped from expressions (defaults such as nextval(...)), so
-- facts compare across schemas. Tables whose name starts with kysely (the reference's migration
-- bookkeeping) are left out.
WITH params AS (
    SELECT $1::text AS schema
),
rel AS (
    SELECT c.oid, c.relname, c.relkind
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN params p
    WHERE n.nspname = p.schema
      AND c.relkind IN ('r', 'p', 'm')
      AND c.relname NOT LIKE 'kysely%'
),
relation_facts AS (
    SELECT 'relation ' || r.relname || ' '
           || CASE r.relkind WHEN 'm' THEN 'materialized view' ELSE 'table' END AS fact
    FROM rel r
),
column_facts AS (
    SELECT 'column ' || r.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || CASE WHEN a.attgenerated = 's'
                   THEN ' generated: ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END
           || CASE WHEN a.attgenerated = '' AND d.adbin IS NOT NULL
                   THEN ' default: ' || replace(pg_get_expr(d.adbin, d.adrelid),
                                                quote_ident(p.schema) || '.', '')
                   ELSE '' END AS fact
    FROM rel r
    CROSS JOIN params p
    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
),
index_cols AS (
    -- one row per index column; k is 0-based, key columns first, then INCLUDE columns
    SELECT x.indexrelid, k,
           k < x.indnkeyatts AS is_key,
           CASE WHEN x.indkey[k] <> 0 THEN a.attname::text
                ELSE pg_get_indexdef(x.indexrelid, k + 1, true) END
           || CASE WHEN k < x.indnkeyatts AND NOT oc.opcdefault
                   THEN ' ' || oc.opcname ELSE '' END
           || CASE WHEN k < x.indnkeyatts AND (x.indoption[k] & 1) = 1
                   THEN ' desc' ELSE '' END
           || CASE WHEN k < x.indnkeyatts AND (x.indoption[k] & 2) = 2
                        AND (x.indoption[k] & 1) = 0 THEN ' nulls first'
                   WHEN k < x.indnkeyatts AND (x.indoption[k] & 2) = 0
                        AND (x.indoption[k] & 1) = 1 THEN ' nulls last'
                   ELSE '' END AS col
    FROM pg_index x
    JOIN rel r ON r.oid = x.indrelid
    CROSS JOIN LATERAL generate_series(0, x.indnatts - 1) AS k
    LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[k]
    LEFT JOIN pg_opclass oc ON oc.oid = x.indclass[k]
),
index_facts AS (
    SELECT 'index ' || r.relname || ' ' || i.relname || ' '
           || CASE WHEN x.indisunique THEN 'unique' ELSE 'nonunique' END || ' '
           || (SELECT string_agg(ic.col, ',' ORDER BY ic.k)
               FROM index_cols ic WHERE ic.indexrelid = x.indexrelid AND ic.is_key)
           || coalesce(' include: ' || (SELECT string_agg(ic.col, ',' ORDER BY ic.k)
                                        FROM index_cols ic
                                        WHERE ic.indexrelid = x.indexrelid AND NOT ic.is_key), '')
           || CASE WHEN am.amname <> 'btree' THEN ' using: ' || am.amname ELSE '' END
           || coalesce(' where: ' || pg_get_expr(x.indpred, x.indrelid, true), '') AS fact
    FROM pg_index x
    JOIN rel r ON r.oid = x.indrelid
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_am am ON am.oid = i.relam
),
constraint_facts AS (
    SELECT 'constraint ' || r.relname || ' ' || con.conname || ' '
           || CASE con.contype WHEN 'p' THEN 'primary key'
                               WHEN 'u' THEN 'unique'
                               WHEN 'f' THEN 'foreign key'
                               WHEN 'c' THEN 'check'
                               WHEN 'x' THEN 'exclude'
                               ELSE con.contype::text END
           || CASE WHEN con.contype IN ('p', 'u', 'f') THEN
                  ' (' || (SELECT string_agg(a.attname::text, ',' ORDER BY k.ord)
                           FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid
                                              AND a.attnum = k.attnum) || ')'
                  ELSE ' ' || pg_get_constraintdef(con.oid, true) END
           || CASE WHEN con.contype = 'f' THEN
                  ' references ' || fr.relname
                  || '(' || (SELECT string_agg(a.attname::text, ',' ORDER BY k.ord)
                             FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
                             JOIN pg_attribute a ON a.attrelid = con.confrelid
                                                AND a.attnum = k.attnum) || ')'
                  || CASE con.confupdtype WHEN 'a' THEN '' ELSE ' on update ' || con.confupdtype::text END
                  || CASE con.confdeltype WHEN 'a' THEN '' ELSE ' on delete ' || con.confdeltype::text END
                  ELSE '' END AS fact
    FROM pg_constraint con
    JOIN rel r ON r.oid = con.conrelid
    LEFT JOIN pg_class fr ON fr.oid = con.confrelid
),
sequence_facts AS (
    SELECT 'sequence ' || s.sequencename || ' ' || format_type(s.data_type, NULL) AS fact
    FROM pg_sequences s
    CROSS JOIN params p
    WHERE s.schemaname = p.schema
)
SELECT fact FROM (
    SELECT fact FROM relation_facts
    UNION ALL SELECT fact FROM column_facts
    UNION ALL SELECT fact FROM index_facts
    UNION ALL SELECT fact FROM constraint_facts
    UNION ALL SELECT fact FROM sequence_facts
) AS facts
ORDER BY fact COLLATE "C";
