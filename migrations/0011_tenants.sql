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

-- The roles the calls of scoped tokens run as (SET ROLE per connection, tracked by the pool): memory_calls for
-- tokens whose grants lie in one scope kind (agent:7, agent:7 and agent:9, project:*), memory_calls_kinds for
-- tokens granted several kinds. Neither can log in nor bypass row-level security; the server refuses to start if
-- one could. Two roles, because the policy that lets PostgreSQL keep its scoped index plans (an equality on the
-- scope kind) can only be written for one kind. Roles belong to the cluster: a second database on the same server
-- finds them already there.
DO $$
DECLARE
    role_ text;
BEGIN
    FOREACH role_ IN ARRAY ARRAY['memory_calls', 'memory_calls_kinds'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT', role_);
        EXCEPTION WHEN duplicate_object THEN
            NULL;
        END;
        -- A superuser may switch to any role; an owner that is not one needs membership to SET ROLE.
        IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
           AND NOT pg_has_role(current_user, role_, 'MEMBER') THEN
            EXECUTE format('GRANT %I TO %I', role_, current_user);
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA memory TO memory_calls, memory_calls_kinds;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA memory TO memory_calls, memory_calls_kinds;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA memory TO memory_calls, memory_calls_kinds;
-- Tables later migrations add are usable by calls too; one that holds memory content needs its own policies.
ALTER DEFAULT PRIVILEGES IN SCHEMA memory
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO memory_calls, memory_calls_kinds;
ALTER DEFAULT PRIVILEGES IN SCHEMA memory GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO memory_calls, memory_calls_kinds;
-- What a call never needs: the tokens themselves, the migrations record, and changing the service's settings.
REVOKE ALL ON memory.tokens FROM memory_calls, memory_calls_kinds;
REVOKE ALL ON memory.schema_migrations FROM memory_calls, memory_calls_kinds;
REVOKE INSERT, UPDATE, DELETE ON memory.settings FROM memory_calls, memory_calls_kinds;

-- The call's grants, as the service sets them per connection: memory.grants ',agent:7,project:*,' (',*,' for every
-- scope), and the same grants taken apart for index conditions: memory.grant_kinds 'agent,project' (the kinds),
-- memory.grant_ids '7' (the ids of the grants naming one), memory.grant_every_id 'on' when a grant covers a kind
-- whole. Unset or empty settings grant nothing.

-- Whether a row of scope (s, i) is granted: a couple of string searches, inlined into the policies that use it.
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

-- Row-level security, FORCEd so that the owner too sees rows only through a policy. Each table has a policy for
-- each calls role and one for the owner (migrations, maintenance, admin and full-access calls), which is a constant
-- true that PostgreSQL drops from its plans: those plan as before. Any other role sees nothing.
--
-- memory_calls compares the scope kind by equality with a scalar subquery, which PostgreSQL evaluates once per
-- statement: "scope = (kind)" is an index condition on (scope, scope_id, id) that keeps scoped scans in id order.
-- The service's own "scope = $1" cannot be one under row-level security, because enum equality is not marked
-- leakproof and PostgreSQL evaluates such conditions only after the policies'. With one kind, the kind and the
-- ids (or every id) are exactly the grants, so no row needs more than two comparisons. Several kinds cannot be
-- compared by one equality: memory_calls_kinds compares with the list, and checks each row against the grants.
DO $$
DECLARE
    table_ text;
BEGIN
    FOREACH table_ IN ARRAY ARRAY['memories', 'memory_versions', 'changes'] LOOP
        EXECUTE format('ALTER TABLE memory.%I ENABLE ROW LEVEL SECURITY', table_);
        EXECUTE format('ALTER TABLE memory.%I FORCE ROW LEVEL SECURITY', table_);
        EXECUTE format($p$
            CREATE POLICY calls ON memory.%I TO memory_calls
            USING (scope = (SELECT nullif(current_setting('memory.grant_kinds', true), '')::memory.scope)
                   AND ((SELECT current_setting('memory.grant_every_id', true) = 'on')
                        OR scope_id = ANY ((SELECT string_to_array(current_setting('memory.grant_ids', true), ','))
                                           ::bigint[])))
            WITH CHECK (memory.granted(scope, scope_id))$p$, table_);
        EXECUTE format($p$
            CREATE POLICY calls_kinds ON memory.%I TO memory_calls_kinds
            USING (scope = ANY ((SELECT string_to_array(current_setting('memory.grant_kinds', true), ','))
                                ::memory.scope[])
                   AND memory.granted(scope, scope_id))
            WITH CHECK (memory.granted(scope, scope_id))$p$, table_);
        EXECUTE format('CREATE POLICY maintenance ON memory.%I TO %I USING (true) WITH CHECK (true)',
                       table_, current_user);
    END LOOP;
END
$$;

ALTER TABLE memory.embedding_cache ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.embedding_cache FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.embedding_cache TO memory_calls, memory_calls_kinds
    USING (owner <> '' AND owner = current_setting('memory.principal', true))
    WITH CHECK (owner <> '' AND owner = current_setting('memory.principal', true));
CREATE POLICY maintenance ON memory.embedding_cache TO CURRENT_USER USING (true) WITH CHECK (true);

-- Full-text matching for scoped calls. Under row-level security PostgreSQL evaluates a query's non-leakproof
-- conditions, "search_tsv @@ query" among them, only on rows the policies already passed, so it cannot use the GIN
-- index: a scoped text search would test every memory of the scope (6x slower than the same search by hand in a
-- 10,000-row scope). This function runs the match as the owner, where the index and the scope index combine, and
-- returns only ids within the caller's grants (memory.grants); the search then reads those rows by id, under the
-- policies as always. It returns ids, never content.
CREATE FUNCTION memory.text_matches(q tsquery) RETURNS SETOF bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kinds memory.scope[] := string_to_array(current_setting('memory.grant_kinds', true), ',')::memory.scope[];
    ids bigint[] := string_to_array(current_setting('memory.grant_ids', true), ',')::bigint[];
BEGIN
    IF current_setting('memory.grant_every_id', true) = 'on' THEN
        RETURN QUERY SELECT m.id FROM memory.memories m
            WHERE m.search_tsv @@ q AND m.scope = ANY (kinds) AND memory.granted(m.scope, m.scope_id);
    ELSE
        RETURN QUERY SELECT m.id FROM memory.memories m
            WHERE m.search_tsv @@ q AND m.scope = ANY (kinds) AND m.scope_id = ANY (ids)
              AND memory.granted(m.scope, m.scope_id);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION memory.text_matches(tsquery) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION memory.text_matches(tsquery) TO memory_calls, memory_calls_kinds;

-- Memories per scope, for quotas without a count(*) per write. Statement triggers on memory.memories append what
-- each statement inserted and deleted (upserts that update change no count) as rows of (scope, scope_id, +n/-n);
-- a scope's count is the sum of its rows, read through the index. Appending takes no lock that another writer could
-- wait for (a counter row updated in place would queue every writer of a scope behind the longest transaction
-- writing to it); the purge loop folds each scope's rows into one (memory_service.memories.purge). Expired
-- memories count until the purge deletes them.
CREATE TABLE memory.scope_usage (
    scope    memory.scope NOT NULL,
    scope_id bigint NOT NULL,
    memories bigint NOT NULL
);
CREATE INDEX scope_usage_scope ON memory.scope_usage (scope, scope_id);
GRANT SELECT, INSERT ON memory.scope_usage TO memory_calls, memory_calls_kinds;
REVOKE UPDATE, DELETE ON memory.scope_usage FROM memory_calls, memory_calls_kinds;
-- Which scope ids exist is not a tenant's business either.
ALTER TABLE memory.scope_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory.scope_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY calls ON memory.scope_usage TO memory_calls, memory_calls_kinds
    USING (memory.granted(scope, scope_id)) WITH CHECK (memory.granted(scope, scope_id));
CREATE POLICY maintenance ON memory.scope_usage TO CURRENT_USER USING (true) WITH CHECK (true);
INSERT INTO memory.scope_usage (scope, scope_id, memories)
SELECT scope, scope_id, count(*) FROM memory.memories GROUP BY scope, scope_id;

-- Memories in the scopes of a grants list (as memory.grants holds it), read through the index.
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
    INSERT INTO memory.scope_usage (scope, scope_id, memories)
    SELECT scope, scope_id, count(*) FROM inserted GROUP BY scope, scope_id;
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
    INSERT INTO memory.scope_usage (scope, scope_id, memories)
    SELECT scope, scope_id, -count(*) FROM deleted GROUP BY scope, scope_id;
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
