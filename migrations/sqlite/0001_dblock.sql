-- dblock schema for SQLite, version 1.
-- Safe to copy into your own migrations; the statement is idempotent.
-- Times are integer microseconds since the Unix epoch, read from SQLite's
-- clock. Rows are never deleted on release, so a name's token never goes back.
CREATE TABLE IF NOT EXISTS dblock_leases (
    name        TEXT    PRIMARY KEY NOT NULL CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 255),
    owner       TEXT,                   -- random id of the current acquisition; NULL once released
    holder      TEXT,                   -- host:pid of the current holder, for people
    mode        TEXT    NOT NULL DEFAULT 'x' CHECK (mode IN ('x', 's')),
    token       INTEGER NOT NULL,       -- last token granted for this name
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL        -- free once passed
) WITHOUT ROWID;
