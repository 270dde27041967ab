-- dblock schema for MySQL 8 / MariaDB 10.6+, version 2: ended lease rows are
-- deleted by a sweep, so the highest token among the rows deleted from each
-- lease table is kept here, and a name's new row starts at it: its token
-- never goes back. Existing lease rows keep their tokens; nothing else moves.
-- Safe to copy into your own migrations; the statements are idempotent.
CREATE TABLE IF NOT EXISTS dblock_token_floor (
    lease_table VARBINARY(255)  NOT NULL,   -- the lease table's name, as given to dblock
    floor       BIGINT UNSIGNED NOT NULL,   -- the highest token deleted from it
    PRIMARY KEY (lease_table)
) ENGINE = InnoDB;
-- The default table's row exists from the start, so that a locking read of
-- it always finds a row to lock (under READ COMMITTED a read of a missing
-- row locks nothing). Other tables get theirs on first use.
INSERT IGNORE INTO dblock_token_floor (lease_table, floor) VALUES ('dblock_leases', 0);
