-- Which rows an HNSW graph holds (docs/search.md, "HNSW: a graph up to a watermark"). The graph is a partial index
-- `WHERE graph_seq <= W`; every row created, and every row an upsert rewrites, takes the sequence's next value, so
-- it lands above the watermark of the graph built before it, in the tail that searches scan exactly, instead of
-- being inserted into the graph row by row. Rows written before this migration read 0 (a constant default adds
-- the column without rewriting the table): every graph built from now on covers them.
CREATE SEQUENCE IF NOT EXISTS memory.memories_graph_seq;
ALTER TABLE memory.memories ADD COLUMN IF NOT EXISTS graph_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE memory.memories ALTER COLUMN graph_seq SET DEFAULT nextval('memory.memories_graph_seq');
ALTER SEQUENCE memory.memories_graph_seq OWNED BY memory.memories.graph_seq;
-- The tail's range scan. Partial: the rows written before this migration (0) are never in a tail, and the index
-- starts empty whatever the table's size.
CREATE INDEX IF NOT EXISTS memories_graph_tail ON memory.memories (graph_seq) WHERE graph_seq > 0;
GRANT USAGE, SELECT, UPDATE ON SEQUENCE memory.memories_graph_seq TO memory_calls, memory_calls_kinds;
