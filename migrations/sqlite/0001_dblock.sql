-- dblock schema for SQLite, version 1.
-- Times are integer microseconds since the Unix epoch, read from SQLite's clock.
CREATE TABLE IF NOT EXISTS dblock_leases (
    name        TEXT    PRIMARY KEY NOT NULL CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 255),
    owner       TEXT,
    holder      TEXT,
    mode        TEXT    NOT NULL DEFAULT 'x',
    token       INTEGER NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
