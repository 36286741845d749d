-- Leases: one row per (namespace, name), the current or most recent grant.

-- Fencing tokens come from one sequence that never cycles: strictly increasing per name across grants,
-- instances and restarts (a sequence never hands out a value twice, even after a crash).
CREATE SEQUENCE memory.fencing_tokens AS bigint NO CYCLE;

CREATE TABLE memory.leases (
    namespace     text NOT NULL,
    name          text NOT NULL,
    lease_id      uuid NOT NULL,
    holder        text NOT NULL,
    -- Who the quota is charged to: the authenticated caller, or the holder when auth is off.
    owner         text NOT NULL,
    fencing_token bigint NOT NULL,
    ttl           interval NOT NULL,
    acquired_at   timestamptz NOT NULL,
    renewed_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    -- Set by Release; a released row stays so the next grant can see the last token.
    released_at   timestamptz,
    PRIMARY KEY (namespace, name),
    CONSTRAINT leases_lease_id UNIQUE (lease_id)
);

CREATE INDEX leases_owner_live ON memory.leases (owner) WHERE released_at IS NULL;

-- Acquire requests already answered, so a retry after an ambiguous commit returns the same grant.
CREATE TABLE memory.lease_requests (
    owner      text NOT NULL,
    request_id text NOT NULL,
    lease_id   uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (owner, request_id)
);
CREATE INDEX lease_requests_created_at ON memory.lease_requests (created_at);
