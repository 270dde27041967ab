-- dblock schema for PostgreSQL, version 2: lease tokens come from
-- dblock_fencing_seq, like advisory tokens, so ended lease rows can be
-- deleted without their names' tokens starting over.
-- Safe to copy into your own migrations; it is idempotent.

-- No claim may run while the counter is raised: every existing token must
-- stay below the next one handed out.
LOCK TABLE dblock_leases IN EXCLUSIVE MODE;

-- Raise the sequence above every token a lease row holds. (A lease table
-- of your own, made with Lease::with_table, needs the same statement with
-- its name: run it once before its rows may be deleted.)
SELECT setval('dblock_fencing_seq', greatest(
    (SELECT last_value FROM dblock_fencing_seq),
    (SELECT coalesce(max(token), 0) FROM dblock_leases),
    1));
