-- dblock schema for PostgreSQL, version 3: the holders of semaphores
-- (`max_holders(n)`) of dblock::postgres::Lease. Existing lease rows and
-- tokens are untouched. Safe to copy into your own migrations; it is
-- idempotent. (A lease table of your own, made with Lease::with_table,
-- needs a holders table named after it with `_holders` appended:
-- CREATE TABLE my_locks_holders (LIKE dblock_leases_holders INCLUDING ALL).)
--
-- One row per permit, keyed by name and token (tokens come from
-- dblock_fencing_seq, so they are unique). While permits of a name are
-- live, its dblock_leases row is their marker: no owner, lasting as long
-- as the latest permit, so plain claims leave the name alone.
CREATE TABLE IF NOT EXISTS dblock_leases_holders (
    name        text        NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 255),
    token       bigint      NOT NULL,   -- the permit's fencing token
    owner       text,                   -- random id of the acquisition; NULL once released
    holder      text,                   -- host:pid of the holder, for people
    max_holders integer     NOT NULL CHECK (max_holders BETWEEN 1 AND 1000000),
    acquired_at timestamptz NOT NULL,   -- by the database clock
    expires_at  timestamptz NOT NULL,   -- by the database clock; free once passed
    PRIMARY KEY (name, token)
) WITH (fillfactor = 70);
