-- dblock schema for MySQL 8 / MariaDB 10.6+, version 1.
-- Safe to copy into your own migrations; the statement is idempotent.
--
-- Lease rows, used by dblock::mysql::Lease and dblock::mysql::lock_in_tx.
-- Ended rows are deleted by dblock's sweep, which keeps the highest token it
-- deleted in dblock_token_floor (version 2): do not prune this table yourself.
--
-- Names and owner ids are VARBINARY so that they compare byte for byte (no
-- collation folds 'A' into 'a' or ignores trailing spaces). Times are UTC in
-- DATETIME(6), always computed from UTC_TIMESTAMP(6), so the session
-- time_zone never matters (a TIMESTAMP column would convert through it).
CREATE TABLE IF NOT EXISTS dblock_leases (
    name        VARBINARY(255)  NOT NULL,           -- the lock's name, UTF-8 bytes
    owner       VARBINARY(64)   NULL,               -- random id of the current acquisition
    holder      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL, -- host:pid, for people
    mode        CHAR(1) CHARACTER SET ascii NOT NULL DEFAULT 'x',
    token       BIGINT UNSIGNED NOT NULL,           -- last fencing token granted for this name
    acquired_at DATETIME(6)     NOT NULL,           -- UTC, database clock
    expires_at  DATETIME(6)     NOT NULL,           -- UTC, database clock; free once passed
    PRIMARY KEY (name),
    KEY dblock_leases_expires_at (expires_at)
) ENGINE = InnoDB;
