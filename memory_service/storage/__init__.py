"""Storage: plain SQL over asyncpg. Nothing here imports grpc."""
