"""The ``memory-service`` command: the entry point and one module per command group."""

from memory_service.cli.main import main

__all__ = ["main"]
