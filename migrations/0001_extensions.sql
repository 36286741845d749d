-- pgvector for embeddings, pg_trgm for fuzzy key lookups.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
