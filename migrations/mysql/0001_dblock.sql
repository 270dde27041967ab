-- dblock schema for MySQL 8 / MariaDB 10.6+, version 1.
-- Names are VARBINARY so that they compare byte for byte (no collation folds
-- 'A' into 'a' or ignores trailing spaces). Times are UTC, DATETIME(6), set
-- from UTC_TIMESTAMP(6) whatever the session time_zone.
CREATE TABLE IF NOT EXISTS dblock_leases (
    name        VARBINARY(255) NOT NULL PRIMARY KEY,
    owner       VARCHAR(64)    NULL,
    holder      VARCHAR(255)   NULL,
    mode        CHAR(1)        NOT NULL DEFAULT 'x',
    token       BIGINT UNSIGNED NOT NULL,
    acquired_at DATETIME(6)    NOT NULL,
    expires_at  DATETIME(6)    NOT NULL,
    KEY dblock_leases_expires_at (expires_at)
) ENGINE = InnoDB;
