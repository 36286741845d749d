-- Leases: one row per (namespace, name), the current or most recent grant.
-- Every acquire, renew and release is one short transaction (a function at the end of this file) that first takes
-- pg_advisory_xact_lock(lock_key); the row, not the lock, is the truth, so a hash collision between two names only
-- makes them wait for each other.

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

-- Each lease operation is one call of one of the functions below, run as a statement of its own: its implicit
-- transaction takes pg_advisory_xact_lock and ends with the statement. So the lock is held only while the database
-- works, never across a network round trip, and a client that vanishes mid-call cannot leave a transaction (or
-- the lock) open. Every PL/pgSQL statement takes a fresh snapshot, so what runs after the lock sees what committed
-- before it. memory_service/storage/leases_sql.py calls them; memory_service/leases.py holds the rules around them.

-- Grant the name unless it is live. Outcomes: granted, held (remaining = seconds to its expiry), over_quota
-- (live = the owner's live leases), replayed (the request id's earlier grant, still live), replay_ended (that
-- grant has ended), request_mismatch (the request id named another lease: lease.namespace and lease.name).
CREATE FUNCTION memory.lease_acquire(
    p_namespace text, p_name text, p_lock_key bigint, p_owner_key bigint, p_lease_id uuid, p_holder text,
    p_owner text, p_ttl interval, p_quota bigint, p_request_id text,
    OUT outcome text, OUT lease memory.leases, OUT remaining float8, OUT live bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_request memory.lease_requests%ROWTYPE;
BEGIN
    -- The name lock, then the owner lock that makes the quota count exact. Acquires never wait for a name lock
    -- while holding an owner lock, and renew and release take one lock only, so the order cannot deadlock.
    PERFORM pg_advisory_xact_lock(p_lock_key);
    PERFORM pg_advisory_xact_lock(p_owner_key);
    IF p_request_id IS NOT NULL THEN
        SELECT r.* INTO v_request FROM memory.lease_requests r
        WHERE r.owner = p_owner AND r.request_id = p_request_id;
        IF FOUND THEN
            IF v_request.namespace <> p_namespace OR v_request.name <> p_name THEN
                outcome := 'request_mismatch';
                lease.namespace := v_request.namespace;
                lease.name := v_request.name;
                RETURN;
            END IF;
            SELECT l.* INTO lease FROM memory.leases l
            WHERE l.lease_id = v_request.lease_id AND l.released_at IS NULL AND l.expires_at > clock_timestamp();
            outcome := CASE WHEN FOUND THEN 'replayed' ELSE 'replay_ended' END;
            RETURN;
        END IF;
    END IF;

    v_now := clock_timestamp();
    SELECT l.* INTO lease FROM memory.leases l WHERE l.namespace = p_namespace AND l.name = p_name;
    IF FOUND AND lease.released_at IS NULL AND lease.expires_at > v_now THEN
        outcome := 'held';
        remaining := extract(epoch FROM lease.expires_at - v_now);
        RETURN;
    END IF;
    SELECT count(*) INTO live FROM memory.leases l
    WHERE l.owner = p_owner AND l.released_at IS NULL AND l.expires_at > v_now;
    IF live >= p_quota THEN
        outcome := 'over_quota';
        lease := NULL;
        RETURN;
    END IF;

    -- The ON CONFLICT condition repeats the liveness check against the row itself: the row, not the lock, is the
    -- truth, so a lock shared by two names whose hashes collide only makes them wait for each other.
    INSERT INTO memory.leases AS l
        (namespace, name, lock_key, lease_id, holder, owner, fencing_token, ttl, acquired_at, renewed_at, expires_at)
    VALUES (p_namespace, p_name, p_lock_key, p_lease_id, p_holder, p_owner, nextval('memory.fencing_tokens'),
            p_ttl, v_now, v_now, v_now + p_ttl)
    ON CONFLICT (namespace, name) DO UPDATE SET
        lock_key = EXCLUDED.lock_key, lease_id = EXCLUDED.lease_id, holder = EXCLUDED.holder,
        owner = EXCLUDED.owner, fencing_token = EXCLUDED.fencing_token, ttl = EXCLUDED.ttl,
        acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at,
        released_at = NULL
    WHERE l.released_at IS NOT NULL OR l.expires_at <= EXCLUDED.acquired_at
    RETURNING l.* INTO lease;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease %/% changed while its lock was held', p_namespace, p_name;
    END IF;
    IF p_request_id IS NOT NULL THEN
        INSERT INTO memory.lease_requests (owner, request_id, lease_id, namespace, name)
        VALUES (p_owner, p_request_id, p_lease_id, p_namespace, p_name);
    END IF;
    live := live + 1;
    outcome := 'granted';
END;
$$;

-- Extend a live lease; never revive one. Outcomes: renewed, expired, released, superseded (the id is no longer the
-- name's grant). greatest(): a renew never shortens a lease, so the TTL already promised stays a lower bound.
CREATE FUNCTION memory.lease_renew(p_lease_id uuid, p_ttl interval, OUT outcome text, OUT lease memory.leases)
LANGUAGE plpgsql AS $$
DECLARE
    v_lock_key bigint;
BEGIN
    SELECT l.lock_key INTO v_lock_key FROM memory.leases l WHERE l.lease_id = p_lease_id;
    IF NOT FOUND THEN
        outcome := 'superseded';
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(v_lock_key);
    UPDATE memory.leases l SET
        ttl = coalesce(p_ttl, l.ttl),
        renewed_at = clock_timestamp(),
        expires_at = greatest(l.expires_at, clock_timestamp() + coalesce(p_ttl, l.ttl))
    WHERE l.lease_id = p_lease_id AND l.released_at IS NULL AND l.expires_at > clock_timestamp()
    RETURNING l.* INTO lease;
    IF FOUND THEN
        outcome := 'renewed';
        RETURN;
    END IF;
    SELECT l.* INTO lease FROM memory.leases l WHERE l.lease_id = p_lease_id;
    outcome := CASE WHEN NOT FOUND THEN 'superseded' WHEN lease.released_at IS NOT NULL THEN 'released'
                    ELSE 'expired' END;
END;
$$;

-- End the grant p_lease_id if it is live, returning its name; NULLs when it had already ended. A newer holder's
-- grant has another id and is never touched.
CREATE FUNCTION memory.lease_release(p_lease_id uuid, OUT released_namespace text, OUT released_name text)
LANGUAGE plpgsql AS $$
DECLARE
    v_lock_key bigint;
BEGIN
    SELECT l.lock_key INTO v_lock_key FROM memory.leases l WHERE l.lease_id = p_lease_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(v_lock_key);
    UPDATE memory.leases l SET released_at = clock_timestamp(), expires_at = least(l.expires_at, clock_timestamp())
    WHERE l.lease_id = p_lease_id AND l.released_at IS NULL AND l.expires_at > clock_timestamp()
    RETURNING l.namespace, l.name INTO released_namespace, released_name;
END;
$$;
