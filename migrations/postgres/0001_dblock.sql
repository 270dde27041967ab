-- dblock schema for PostgreSQL, version 1.
-- Safe to copy into your own migrations; every statement is idempotent.

-- Fencing tokens of advisory locks: one sequence for all names, so a token
-- is greater than every token handed out before it, across restarts.
CREATE SEQUENCE IF NOT EXISTS dblock_fencing_seq AS bigint MINVALUE 1;

-- Lease rows, used by dblock::postgres::Lease. Rows are never deleted on
-- release, so a name's token never goes back.
--
-- Every renewal rewrites expires_at. There is deliberately no index on it:
-- with none on the columns that change, renewals are HOT updates (no index
-- writes), helped by the free space the fillfactor leaves on each page.
-- Listing live leases scans the table, which holds one row per name.
CREATE TABLE IF NOT EXISTS dblock_leases (
    name        text        PRIMARY KEY CHECK (octet_length(name) BETWEEN 1 AND 255),
    owner       text,                   -- random id of the current acquisition; NULL once released
    holder      text,                   -- host:pid of the current holder, for people
    mode        char(1)     NOT NULL DEFAULT 'x',
    token       bigint      NOT NULL,   -- last token granted for this name
    acquired_at timestamptz NOT NULL,   -- by the database clock
    expires_at  timestamptz NOT NULL    -- by the database clock; free once passed
) WITH (fillfactor = 70);
