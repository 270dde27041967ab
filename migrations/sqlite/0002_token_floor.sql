-- dblock schema for SQLite, version 2: ended lease rows are deleted, so the
-- highest token among the rows deleted from each lease table is kept here,
-- and a name's new row starts above it: its token never goes back.
-- Safe to copy into your own migrations; the statement is idempotent.
CREATE TABLE IF NOT EXISTS dblock_token_floor (
    lease_table TEXT    PRIMARY KEY NOT NULL,  -- the lease table's name, as given to dblock
    floor       INTEGER NOT NULL               -- the highest token deleted from it
) WITHOUT ROWID;
