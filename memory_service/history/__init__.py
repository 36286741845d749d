"""History and changes: versions of every memory, as-of reads, erasure with a receipt, and the change stream."""
