-- Memories, the embedding cache and the service's own settings.

CREATE TYPE memory.scope AS ENUM ('global', 'circle', 'agent', 'conversation', 'project');
CREATE TYPE memory.memory_type AS ENUM
    ('fact', 'preference', 'experience', 'skill', 'relationship', 'context', 'decision');

-- Facts the service records about the database itself: the embedding model and dimension, index state.
CREATE TABLE memory.settings (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE memory.memories (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    scope           memory.scope NOT NULL,
    scope_id        bigint NOT NULL,
    agent_id        bigint,
    memory_type     memory.memory_type NOT NULL DEFAULT 'fact',
    key             varchar(200) NOT NULL,
    value           text NOT NULL,
    -- The dimension is bound on first start (ALTER ... TYPE vector(D)), once the configured model is known.
    embedding       vector,
    importance      real NOT NULL DEFAULT 0.5 CHECK (importance >= 0 AND importance <= 1),
    tags            text[] NOT NULL DEFAULT '{}',
    metadata        jsonb NOT NULL DEFAULT '{}',
    content_hash    bytea NOT NULL,
    embedding_model text,
    -- Stored, so ranking reads it instead of recomputing to_tsvector for every matching row.
    -- Keys derived from the content hash carry no words and are left out.
    search_tsv      tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig,
                              CASE WHEN key LIKE 'sha256:%' THEN '' ELSE replace(key, '_', ' ') END), 'A')
        || setweight(to_tsvector('english'::regconfig, value), 'B')
    ) STORED,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at      timestamptz,
    -- Every unique constraint includes scope_id, so the table can be distributed by scope_id (Citus).
    PRIMARY KEY (id, scope_id),
    CONSTRAINT memories_identity UNIQUE (scope, scope_id, key),
    CONSTRAINT memories_global_scope_id CHECK (scope <> 'global' OR scope_id = 0)
);

CREATE INDEX memories_search_tsv ON memory.memories USING gin (search_tsv);
CREATE INDEX memories_agent_id ON memory.memories (agent_id) WHERE agent_id IS NOT NULL;
CREATE INDEX memories_memory_type ON memory.memories (memory_type);
CREATE INDEX memories_expires_at ON memory.memories (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX memories_created_at ON memory.memories (created_at);
CREATE INDEX memories_tags ON memory.memories USING gin (tags);
CREATE INDEX memories_metadata ON memory.memories USING gin (metadata jsonb_path_ops);
-- (scope, scope_id) lookups use the leading columns of memories_identity.

-- Embeddings by content, so a text already embedded with this model costs no provider call.
CREATE TABLE memory.embedding_cache (
    model        text NOT NULL,
    dimension    integer NOT NULL,
    content_hash bytea NOT NULL,
    embedding    vector NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (model, dimension, content_hash)
);
