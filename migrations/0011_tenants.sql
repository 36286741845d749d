-- Tenants (issue 16): tokens bound to scope grants, row-level security on every table that holds memory content,
-- and per-scope counts for memory quotas. docs/security.md tells the whole model.

-- Tokens. Only the SHA-256 of the secret is kept: secrets are 256 random bits, so a fast hash is enough and a lookup
-- by it is one index probe. Revoked tokens keep their row (revoked_at), so "a token has existed" never turns back
-- into "auth is off" when the last one is revoked.
CREATE TABLE memory.tokens (
    name             text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    secret_sha256    bytea NOT NULL UNIQUE,
    -- 'agent:7' one scope id, 'project:*' every id of a scope kind, '*' every scope.
    scopes           text[] NOT NULL,
    -- Any of 'read', 'write', 'erase', 'admin'.
    permissions      text[] NOT NULL,
    lease_namespaces text[] NOT NULL DEFAULT '{}',
    max_memories     bigint CHECK (max_memories >= 0),
    rate             double precision CHECK (rate > 0),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at       timestamptz,
    revoked_at       timestamptz,
    last_used_at     timestamptz
);

-- The role the calls of a scoped token run as (SET ROLE per connection, tracked by the pool). It cannot log in and
-- does not bypass row-level security; the server refuses to start if it could. Roles belong to the cluster, so a
-- second database on the same server finds it already there.
DO $$
BEGIN
    CREATE ROLE memory_calls NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

-- A superuser may switch to any role; an owner that is not one needs membership to SET ROLE.
DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'memory_calls', 'MEMBER') THEN
        EXECUTE format('GRANT memory_calls TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE ON SCHEMA memory TO memory_calls;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA memory TO memory_calls;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA memory TO memory_calls;
-- Tables later migrations add are usable by calls too; one that holds memory content needs its own policy.
ALTER DEFAULT PRIVILEGES IN SCHEMA memory GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO memory_calls;
ALTER DEFAULT PRIVILEGES IN SCHEMA memory GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO memory_calls;
-- What a call never needs: the tokens themselves, the migrations record, and changing the service's settings.
REVOKE ALL ON memory.tokens FROM memory_calls;
REVOKE ALL ON memory.schema_migrations FROM memory_calls;
REVOKE INSERT, UPDATE, DELETE ON memory.settings FROM memory_calls;

-- Whether a row of scope (s, i) is among the call's grants. The service sets memory.grants per connection as
-- ',agent:7,project:*,' (or ',*,'); unset or empty grants nothing. A plain SQL function, so PostgreSQL inlines it
-- into each policy: a couple of string searches per row, no function call.
CREATE FUNCTION memory.granted(s memory.scope, i bigint) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT strpos(current_setting('memory.grants', true), ',' || s::text || ':' || i::text || ',') > 0
        OR strpos(current_setting('memory.grants', true), ',' || s::text || ':*,') > 0
        OR current_setting('memory.grants', true) = ',*,'
$$;

-- The embedding cache is keyed by content: a scoped token reads and writes only the entries it computed itself
-- (owner = its name), so no tenant can read another's vectors, nor learn from a cache hit that a text was stored.
-- Calls that see every scope, and maintenance, share the entries with owner ''.
ALTER TABLE memory.embedding_cache
    ADD COLUMN owner text NOT NULL DEFAULT coalesce(current_setting('memory.principal', true), '');
ALTER TABLE memory.embedding_cache DROP CONSTRAINT embedding_cache_pkey;
ALTER TABLE memory.embedding_cache ADD PRIMARY KEY (model, dimension, content_hash, owner);

-- Row-level security, FORCEd so that the owner too sees rows only through a policy. Two policies each: calls of
-- scoped tokens (memory_calls) see and write rows of their grants; the owner (migrations, maintenance, admin and
-- full-access calls) sees everything. Any other role sees nothing. The owner's policy is a constant true, which
-- PostgreSQL drops from its plans: maintenance and full-access calls plan as before.
ALTER TABLE memory.memories ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.memories FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.memories TO memory_calls
    USING (memory.granted(scope, scope_id)) WITH CHECK (memory.granted(scope, scope_id));
CREATE POLICY maintenance ON memory.memories TO CURRENT_USER USING (true) WITH CHECK (true);

ALTER TABLE memory.memory_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.memory_versions FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.memory_versions TO memory_calls
    USING (memory.granted(scope, scope_id)) WITH CHECK (memory.granted(scope, scope_id));
CREATE POLICY maintenance ON memory.memory_versions TO CURRENT_USER USING (true) WITH CHECK (true);

ALTER TABLE memory.changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.changes FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.changes TO memory_calls
    USING (memory.granted(scope, scope_id)) WITH CHECK (memory.granted(scope, scope_id));
CREATE POLICY maintenance ON memory.changes TO CURRENT_USER USING (true) WITH CHECK (true);

ALTER TABLE memory.embedding_cache ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.embedding_cache FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.embedding_cache TO memory_calls
    USING (owner <> '' AND owner = current_setting('memory.principal', true))
    WITH CHECK (owner <> '' AND owner = current_setting('memory.principal', true));
CREATE POLICY maintenance ON memory.embedding_cache TO CURRENT_USER USING (true) WITH CHECK (true);

-- Memories per scope, for quotas without a count(*) per write: statement triggers add what each statement inserted
-- and subtract what it deleted (upserts that update change no count). Each backend adds to its own shard of a scope,
-- so concurrent writers of one scope do not queue on one counter row; a count is the sum of a scope's shards.
-- Expired memories count until the purge deletes them.
CREATE TABLE memory.scope_usage (
    scope    memory.scope NOT NULL,
    scope_id bigint NOT NULL,
    shard    smallint NOT NULL,
    memories bigint NOT NULL,
    PRIMARY KEY (scope, scope_id, shard)
);
GRANT SELECT, INSERT, UPDATE ON memory.scope_usage TO memory_calls;
-- Which scope ids exist is not a tenant's business either.
ALTER TABLE memory.scope_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.scope_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.scope_usage TO memory_calls
    USING (memory.granted(scope, scope_id)) WITH CHECK (memory.granted(scope, scope_id));
CREATE POLICY maintenance ON memory.scope_usage TO CURRENT_USER USING (true) WITH CHECK (true);
INSERT INTO memory.scope_usage (scope, scope_id, shard, memories)
SELECT scope, scope_id, 0, count(*) FROM memory.memories GROUP BY scope, scope_id;

-- Live memories in the scopes of a grants list (as memory.grants holds it), read through the primary key.
CREATE FUNCTION memory.usage_in(grants text) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE
    grant_ text;
    total bigint := 0;
    part bigint;
BEGIN
    FOREACH grant_ IN ARRAY string_to_array(trim(BOTH ',' FROM coalesce(grants, '')), ',') LOOP
        IF grant_ = '*' THEN
            SELECT coalesce(sum(memories), 0) INTO part FROM memory.scope_usage;
            RETURN part;
        ELSIF split_part(grant_, ':', 2) = '*' THEN
            SELECT coalesce(sum(memories), 0) INTO part FROM memory.scope_usage
            WHERE scope = split_part(grant_, ':', 1)::memory.scope;
        ELSE
            SELECT coalesce(sum(memories), 0) INTO part FROM memory.scope_usage
            WHERE scope = split_part(grant_, ':', 1)::memory.scope AND scope_id = split_part(grant_, ':', 2)::bigint;
        END IF;
        total := total + part;
    END LOOP;
    RETURN total;
END
$$;

-- After the counts: a call of a token with a memory quota (memory.max_memories, set with its grants) that inserted
-- memories fails with SQLSTATE MS429 when its scopes now hold more than the quota, so the whole statement, and the
-- transaction, is undone. A transaction-level advisory lock per token makes one token's writers check one at a time,
-- each seeing the other's committed count.
CREATE FUNCTION memory.count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    quota bigint := nullif(current_setting('memory.max_memories', true), '')::bigint;
    used bigint;
    added bigint;
BEGIN
    INSERT INTO memory.scope_usage AS u (scope, scope_id, shard, memories)
    SELECT scope, scope_id, pg_backend_pid() % 8, count(*) FROM inserted GROUP BY scope, scope_id
    ON CONFLICT (scope, scope_id, shard) DO UPDATE SET memories = u.memories + EXCLUDED.memories;
    GET DIAGNOSTICS added = ROW_COUNT;
    IF quota IS NOT NULL AND added > 0 THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('memory quota ' || current_setting('memory.principal', true), 0));
        used := memory.usage_in(current_setting('memory.grants', true));
        IF used > quota THEN
            RAISE EXCEPTION 'memory quota of % exceeded: its scopes would hold % memories', quota, used
                USING ERRCODE = 'MS429';
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION memory.count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory.scope_usage AS u (scope, scope_id, shard, memories)
    SELECT scope, scope_id, pg_backend_pid() % 8, -count(*) FROM deleted GROUP BY scope, scope_id
    ON CONFLICT (scope, scope_id, shard) DO UPDATE SET memories = u.memories + EXCLUDED.memories;
    RETURN NULL;
END
$$;

CREATE FUNCTION memory.count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM memory.scope_usage;
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_count_inserted AFTER INSERT ON memory.memories
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION memory.count_inserted();
CREATE TRIGGER memories_count_deleted AFTER DELETE ON memory.memories
    REFERENCING OLD TABLE AS deleted FOR EACH STATEMENT EXECUTE FUNCTION memory.count_deleted();
CREATE TRIGGER memories_count_truncated AFTER TRUNCATE ON memory.memories
    FOR EACH STATEMENT EXECUTE FUNCTION memory.count_truncated();
