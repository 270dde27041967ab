-- dblock schema for MySQL 8 / MariaDB 10.6+, version 4: shared (reader)
-- leases of dblock::mysql::Lease. Existing lease rows, holder rows and
-- tokens are untouched (the new nullable column is added in place).
-- Safe to copy into your own migrations; the statements are idempotent
-- (MySQL has no ADD COLUMN IF NOT EXISTS, hence the prepared statement).
-- A lease table of your own, made with Lease::with_table, needs the same
-- column.
--
-- Readers are rows of dblock_leases_holders (version 3) with
-- max_holders = 1, each with its own token; while readers are live, the
-- name's dblock_leases row is their marker with mode 's'. A writer that
-- finds readers there and is going to wait sets writer_waiting_until (UTC,
-- by the server clock, a little past its next try) at each of its tries;
-- new readers stay out while it lies ahead, so readers arriving in a row
-- never keep a writer out. It lapses by itself if the writer goes away,
-- and a writer's claim clears it.
SET @dblock_step = IF(
    (SELECT COUNT(*) FROM information_schema.COLUMNS
      WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'dblock_leases'
        AND COLUMN_NAME = 'writer_waiting_until') = 0,
    'ALTER TABLE dblock_leases ADD COLUMN writer_waiting_until DATETIME(6) NULL',
    'DO 0');
PREPARE dblock_step FROM @dblock_step;
EXECUTE dblock_step;
DEALLOCATE PREPARE dblock_step;
