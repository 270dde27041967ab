-- dblock schema for PostgreSQL, version 1.
-- Safe to copy into your own migrations; every statement is idempotent.

-- Fencing tokens of advisory locks: one sequence for all names, so a token
-- is greater than every token handed out before it, across restarts.
CREATE SEQUENCE IF NOT EXISTS dblock_fencing_seq AS bigint MINVALUE 1;

-- Lease rows, used by dblock::postgres::Lease. Rows are never deleted on
-- release, so a name's token never goes back.
CREATE TABLE IF NOT EXISTS dblock_leases (
    name        text        PRIMARY KEY CHECK (octet_length(name) BETWEEN 1 AND 255),
    owner       text,                   -- random id of the current acquisition
    holder      text,                   -- host:pid of the current holder, for people
    mode        char(1)     NOT NULL DEFAULT 'x',
    token       bigint      NOT NULL,   -- last token granted for this name
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL    -- by the database clock; free once passed
);

CREATE INDEX IF NOT EXISTS dblock_leases_expires_at ON dblock_leases (expires_at);
