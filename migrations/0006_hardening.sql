-- Every stored expiry must be readable: asyncpg decodes timestamptz into Python datetimes and the service answers
-- protobuf Timestamps, and both end at year 9999 (and start at year 0001). PostgreSQL stores far later dates, so
-- a TTL of about 2.5e11 s once stored rows that made every read that met them fail.
--
-- Repair such rows (an expiry past 9999 becomes the latest storable instant, which reads as "practically never";
-- one before year 0001 becomes 0001-01-01, long expired, so the purge removes it), then forbid new ones.
-- 'infinity' and '-infinity' stay allowed: the driver reads them as the largest and smallest datetime.
UPDATE memory.memories
SET expires_at = '9999-12-31 23:59:59.999999+00'
WHERE expires_at > '9999-12-31 23:59:59.999999+00' AND expires_at <> 'infinity';

UPDATE memory.memories
SET expires_at = '0001-01-01 00:00:00+00'
WHERE expires_at < '0001-01-01 00:00:00+00' AND expires_at <> '-infinity';

ALTER TABLE memory.memories DROP CONSTRAINT IF EXISTS memories_expires_at_readable;
ALTER TABLE memory.memories ADD CONSTRAINT memories_expires_at_readable CHECK (
    expires_at IS NULL
    OR expires_at IN ('infinity', '-infinity')
    OR expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'
);
