"""memory-service: long-term memory for AI agents in PostgreSQL, served over gRPC."""

__version__ = "0.1.0"
