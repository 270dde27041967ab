-- dblock schema for SQLite, version 3: the holders of semaphores
-- (`max_holders(n)`) of dblock::sqlite::Lease. Existing lease rows and
-- tokens are untouched. Safe to copy into your own migrations; the
-- statement is idempotent. (A lease table of your own, made with
-- Lease::with_table, needs a holders table like this one named after it
-- with `_holders` appended.)
--
-- One row per permit, keyed by name and token. While permits of a name are
-- live, its dblock_leases row is their marker: no owner, lasting as long
-- as the latest permit, its token the name's latest, so plain claims leave
-- the name alone and every later token is greater.
CREATE TABLE IF NOT EXISTS dblock_leases_holders (
    name        TEXT    NOT NULL CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 255),
    token       INTEGER NOT NULL,       -- the permit's fencing token
    owner       TEXT,                   -- random id of the acquisition; NULL once released
    holder      TEXT,                   -- host:pid of the holder, for people
    max_holders INTEGER NOT NULL CHECK (max_holders BETWEEN 1 AND 1000000),
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,       -- free once passed
    PRIMARY KEY (name, token)
) WITHOUT ROWID;
