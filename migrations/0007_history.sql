-- History and changes (issue 12): a version per change of a memory, and a change log that Watch reads.

CREATE TYPE memory.change_kind AS ENUM ('created', 'updated', 'deleted', 'expired', 'erased');

-- Each memory counts its own versions; the upsert bumps it (version = m.version + 1) while it holds the row lock,
-- so two concurrent writers of one memory can never take the same number. Adding a column with a constant default
-- rewrites nothing.
ALTER TABLE memory.memories ADD COLUMN IF NOT EXISTS version integer NOT NULL DEFAULT 1;

-- One row per version: the memory as it was after the change (for 'deleted' and 'expired', as it was when it went),
-- so the content before any change is the version below it. Written in the same statement as the change itself.
-- Embeddings are not kept: they are derived data, and keeping them would double the table's largest column.
CREATE TABLE memory.memory_versions (
    memory_id       bigint NOT NULL,
    version         integer NOT NULL,
    kind            memory.change_kind NOT NULL,
    scope           memory.scope NOT NULL,
    scope_id        bigint NOT NULL,
    agent_id        bigint,
    memory_type     memory.memory_type NOT NULL,
    key             varchar(200) NOT NULL,
    value           text NOT NULL,
    importance      real NOT NULL,
    tags            text[] NOT NULL,
    metadata        jsonb NOT NULL,
    content_hash    bytea NOT NULL,
    embedding_model text,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    -- The database time of the change (clock_timestamp(), as updated_at).
    changed_at      timestamptz NOT NULL,
    principal       text,
    fencing_token   bigint,
    request_id      text,
    PRIMARY KEY (memory_id, version)
);
-- Retention purges by age. Versions are appended in about changed_at order, so a BRIN index finds the old ones
-- while costing writes next to nothing (a btree here cost Store throughput measurably).
CREATE INDEX memory_versions_changed_at ON memory.memory_versions USING brin (changed_at);

-- The change log Watch reads, in seq order. seq comes from a sequence with CACHE 1 (the default), read by the
-- watchers' frontier (memory_service.history.feed): every seq it has handed out is visible in last_value at once,
-- which a per-session cache would break. txid is a column before seq, so the row's transaction holds an xid before
-- its seq is drawn (defaults are evaluated in column order, and the changed memory row is written first anyway);
-- the frontier relies on that.
CREATE SEQUENCE memory.change_seq AS bigint CACHE 1;

CREATE TABLE memory.changes (
    txid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq        bigint NOT NULL DEFAULT nextval('memory.change_seq'),
    memory_id  bigint NOT NULL,
    scope      memory.scope NOT NULL,
    scope_id   bigint NOT NULL,
    kind       memory.change_kind NOT NULL,
    version    integer NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (seq)
);
-- No other index: Watch reads by seq, the retention purge walks seq from the oldest, and only Erase looks rows up
-- by memory_id (a scan of this narrow table, for a rare operation, rather than an index every write maintains).

-- A wake-up for watchers, once per writing statement (not per row), and only while some instance with watchers is
-- idle and waiting for it: NOTIFY serialises the commits of notifying transactions, which cost Store a sixth to a
-- third of its throughput when every write paid it (bench/history.py). A busy feed polls instead and marks itself
-- not sleeping. Instances with watchers keep a row here, refreshed well within the minute; a crashed instance's row
-- stops counting after it. Feeds poll as well, so a lost notification only delays.
CREATE UNLOGGED TABLE memory.watch_listeners (
    instance text PRIMARY KEY,
    sleeping boolean NOT NULL DEFAULT true,
    seen_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION memory.notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM memory.watch_listeners
               WHERE sleeping AND seen_at > clock_timestamp() - interval '1 minute') THEN
        PERFORM pg_notify('memory_changes', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER changes_notify AFTER INSERT ON memory.changes
    FOR EACH STATEMENT EXECUTE FUNCTION memory.notify_change();

-- Memories stored before history existed get a first version, so History and as_of reads know them.
INSERT INTO memory.memory_versions
    (memory_id, version, kind, scope, scope_id, agent_id, memory_type, key, value, importance, tags, metadata,
     content_hash, embedding_model, created_at, expires_at, changed_at)
SELECT id, version, 'created', scope, scope_id, agent_id, memory_type, key, value, importance, tags, metadata,
       content_hash, embedding_model, created_at, expires_at, updated_at
FROM memory.memories;
