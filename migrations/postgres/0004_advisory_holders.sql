-- dblock schema for PostgreSQL, version 4: who holds an advisory lock that
-- was taken with a holder identity (a leader's, see dblock::Election).
-- Safe to copy into your own migrations; it is idempotent.
--
-- A row belongs to the lock while the server session (pid, backend_start)
-- that recorded it still holds the lock's key exclusively; readers join it
-- with pg_locks, so a row left by a session that ended means nothing. One
-- row per name: the footprint follows the names used for elections.
CREATE TABLE IF NOT EXISTS dblock_advisory_holders (
    name          text        PRIMARY KEY,
    holder        text        NOT NULL,
    token         bigint      NOT NULL,
    pid           integer     NOT NULL,
    backend_start timestamptz,
    since         timestamptz NOT NULL
);
