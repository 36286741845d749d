-- Keep each embedding in its row. pgvector's type defaults to STORAGE EXTERNAL, so once a row passes about 2 kB
-- (a 384-dimension vector is 1.5 kB; a paragraph of text and its tsvector do the rest) PostgreSQL moves the vector
-- out to the TOAST table, and every exact distance reads it back from there: an exact scan of 10,000 MiniLM memories
-- of SciFact took 20.9 ms with the vectors out of line and 7.2 ms with them in the row. MAIN keeps the vector inline
-- and lets the text, tsvector and metadata go out of line first (they are read only for the hits).
-- Only rows written from now on are laid out this way; rows already stored move when they are next updated.
ALTER TABLE memory.memories ALTER COLUMN embedding SET STORAGE MAIN;
