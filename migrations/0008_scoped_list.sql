-- List of one scope pages by id (keyset: id > cursor ORDER BY id). Without an index that leads with the scope,
-- PostgreSQL walks the primary key over every scope's rows to find one scope's next page, so a page of a small
-- scope cost as much as the whole table. With (scope, scope_id, id) a page reads only its own rows.
CREATE INDEX memories_scope_list ON memory.memories (scope, scope_id, id);
