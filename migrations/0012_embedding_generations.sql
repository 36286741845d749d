-- A second embedding column, so a database can move to another embedding model without starting over
-- (docs/model-migration.md). The column named `embedding` always holds the generation searches use; during a move
-- `embedding_alt` holds the other one: the next model's vectors while they are backfilled, the previous model's
-- after a cut-over, until `model finish` drops them. A move types the column (vector(D)) when it begins, by
-- dropping and re-adding it: adding a nullable column rewrites nothing.
ALTER TABLE memory.memories ADD COLUMN IF NOT EXISTS embedding_alt vector;
ALTER TABLE memory.memories ALTER COLUMN embedding_alt SET STORAGE MAIN;

-- Every statement that reads or writes embeddings names the generation it was planned for: the counter that each
-- move, cut-over, rollback and finish increments (memory.settings 'embedding_epoch', absent = 0). A statement of
-- an instance that has not seen the latest change fails with SQLSTATE MSG01 instead of comparing or storing
-- vectors of another model; the instance re-reads the state and runs it again. STABLE and called with constants
-- only, PostgreSQL evaluates it once per statement.
CREATE OR REPLACE FUNCTION memory.embedding_generation_is(expected bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    current bigint;
BEGIN
    SELECT value::bigint INTO current FROM memory.settings WHERE key = 'embedding_epoch';
    IF coalesce(current, 0) <> expected THEN
        RAISE EXCEPTION 'embedding generation % is no longer current (now %)', expected, coalesce(current, 0)
            USING ERRCODE = 'MSG01';
    END IF;
    RETURN true;
END
$$;
