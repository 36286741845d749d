-- Tidy-up: drop what nothing uses, and let the schema state rules the service already keeps.

-- Seven values over the whole table: no query filters on memory_type alone (it is always one condition among
-- others), so the btree cost every write and served no read.
DROP INDEX IF EXISTS memory.memories_memory_type;

-- pg_trgm was installed for fuzzy key lookups that were never built. It is dropped unless something has come to
-- depend on it (an index with a trigram operator class, say), in which case it stays and this says so.
DO $$
BEGIN
    DROP EXTENSION IF EXISTS pg_trgm;
EXCEPTION WHEN dependent_objects_still_exist THEN
    RAISE NOTICE 'pg_trgm is in use and is kept';
END
$$;

-- Names are checked by the service (memory_service.leases.rules.MAX_NAME_LENGTH); the table says the same.
ALTER TABLE memory.leases
    ADD CONSTRAINT leases_namespace_length CHECK (char_length(namespace) BETWEEN 1 AND 200),
    ADD CONSTRAINT leases_name_length CHECK (char_length(name) BETWEEN 1 AND 200);

-- An embedding is always stored with the model that made it, so a search never compares vectors of two models.
-- NOT VALID: enforced for every write from now on without scanning (and locking) a large table during the
-- migration; every row the service wrote already has both. Operators may run
-- ALTER TABLE memory.memories VALIDATE CONSTRAINT memories_embedding_model, which does not block writes.
ALTER TABLE memory.memories
    ADD CONSTRAINT memories_embedding_model CHECK ((embedding IS NULL) = (embedding_model IS NULL)) NOT VALID;

-- The embedding cache is bounded by age: the purge task deletes entries older than the cache retention, oldest
-- first, through this index. An evicted entry costs one provider call the next time its text is embedded.
CREATE INDEX IF NOT EXISTS embedding_cache_created_at ON memory.embedding_cache (created_at);
