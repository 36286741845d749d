-- A Store without ttl or expires_at wrote expires_at = 9999-12-31 23:59:59.999999+00 instead of NULL: its
-- expiry expression was LEAST(clock_timestamp() + make_interval(secs => NULL), latest), and LEAST ignores NULL
-- arguments. Such a memory reported an expiry where the contract says "unset: never expires", and as-of reads at
-- the last representable instant missed it. An expiry at the last representable microsecond (or 'infinity', which
-- older drivers wrote for datetime.max) cannot be told apart from "never", and means the same: both become NULL,
-- in the live rows and in the versions that copied them. Nothing else about the rows changes: this repairs how an
-- expiry is stored, it is not a change to the memory, so it records no version.
UPDATE memory.memories
SET expires_at = NULL
WHERE expires_at IN ('9999-12-31 23:59:59.999999+00', 'infinity');

UPDATE memory.memory_versions
SET expires_at = NULL
WHERE expires_at IN ('9999-12-31 23:59:59.999999+00', 'infinity');
