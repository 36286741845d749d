-- Corpus statistics for BM25 text ranking, kept by the service (search/text_stats.py), refreshed in the background.
--
-- Document frequencies per lexeme and the corpus totals are computed together from the live memories, so idf and
-- the average document length always describe the same snapshot. Ranking reads a handful of rows per query
-- (one per query lexeme) instead of counting postings, which keeps broad queries on large tables cheap.

CREATE TABLE memory.text_terms (
    lexeme text PRIMARY KEY,
    -- Live memories whose search_tsv holds the lexeme.
    df     integer NOT NULL CHECK (df > 0)
);

-- One row: the totals of the snapshot text_terms was computed from.
CREATE TABLE memory.text_corpus (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    docs          bigint NOT NULL,
    -- Sum of length(search_tsv) (distinct lexemes per memory): the BM25 document length.
    total_length  bigint NOT NULL,
    -- pg_stat_user_tables' write counters for memory.memories when the snapshot was taken, to tell how much
    -- changed since.
    writes_seen   bigint NOT NULL,
    refreshed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Any-word tsquery from lexemes that are already normalised (the output of to_tsvector): each one quoted so that
-- punctuation inside a lexeme ("foo@bar.com", "3.5") is kept whole, never parsed as query syntax.
CREATE FUNCTION memory.any_lexeme_query(lexemes text[]) RETURNS tsquery
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (
        SELECT string_agg('''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery
        FROM unnest(lexemes) AS l
    );
