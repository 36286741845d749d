-- Leases: one row per (namespace, name), the current or most recent grant.
-- Every acquire, renew and release is one short transaction that first takes pg_advisory_xact_lock(lock_key);
-- the row, not the lock, is the truth, so a hash collision between two names only makes them wait for each other.

-- Fencing tokens come from one sequence that never cycles: strictly increasing per name across grants,
-- instances and restarts (a sequence never hands out a value twice, even after a crash).
CREATE SEQUENCE memory.fencing_tokens AS bigint NO CYCLE;

CREATE TABLE memory.leases (
    namespace     text NOT NULL,
    name          text NOT NULL,
    -- The stable 64-bit hash of (namespace, name) the service locks on, kept so that Renew and Release, which
    -- know only the lease id, take the same lock in one statement.
    lock_key      bigint NOT NULL,
    lease_id      uuid NOT NULL,
    holder        text NOT NULL,
    -- Who the quota is charged to: the authenticated caller, or the holder when auth is off.
    owner         text NOT NULL,
    -- The newest grant's token: fenced writes compare against it (memory_service/storage/fencing.py).
    fencing_token bigint NOT NULL,
    ttl           interval NOT NULL CHECK (ttl > interval '0'),
    acquired_at   timestamptz NOT NULL,
    renewed_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    -- Set by Release; a released row stays (until purged long after) so fenced writes still find its token.
    released_at   timestamptz,
    PRIMARY KEY (namespace, name),
    CONSTRAINT leases_lease_id UNIQUE (lease_id)
);

CREATE INDEX leases_owner_live ON memory.leases (owner) WHERE released_at IS NULL;

-- Acquire requests already granted, so a retry after an ambiguous commit returns the same grant.
CREATE TABLE memory.lease_requests (
    owner      text NOT NULL,
    request_id text NOT NULL,
    lease_id   uuid NOT NULL,
    namespace  text NOT NULL,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (owner, request_id)
);
CREATE INDEX lease_requests_created_at ON memory.lease_requests (created_at);
