-- dblock schema for MySQL 8 / MariaDB 10.6+, version 3: the holders of
-- semaphores (`max_holders(n)`) of dblock::mysql::Lease. Existing lease
-- rows and tokens are untouched. Safe to copy into your own migrations;
-- the statement is idempotent. (A lease table of your own, made with
-- Lease::with_table, needs a holders table like this one named after it
-- with `_holders` appended.)
--
-- One row per permit, keyed by name and token. While permits of a name are
-- live, its dblock_leases row is their marker: no owner, lasting as long
-- as the latest permit, its token the name's latest, so plain claims leave
-- the name alone and every later token is greater. Ended rows are deleted
-- by dblock's sweep.
CREATE TABLE IF NOT EXISTS dblock_leases_holders (
    name        VARBINARY(255)  NOT NULL,           -- the lock's name, UTF-8 bytes
    token       BIGINT UNSIGNED NOT NULL,           -- the permit's fencing token
    owner       VARBINARY(64)   NULL,               -- random id of the acquisition; NULL once released
    holder      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL, -- host:pid, for people
    max_holders INT UNSIGNED    NOT NULL,           -- the semaphore's n
    acquired_at DATETIME(6)     NOT NULL,           -- UTC, database clock
    expires_at  DATETIME(6)     NOT NULL,           -- UTC, database clock; free once passed
    PRIMARY KEY (name, token),
    KEY dblock_leases_holders_expires_at (expires_at)
) ENGINE = InnoDB;
