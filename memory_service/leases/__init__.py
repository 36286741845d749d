"""Leases: named locks with a TTL and a fencing token (manager, Hold stream, request rules, types).

Import the modules themselves (``memory_service.leases.manager``); this package imports nothing, so that storage
can import ``memory_service.leases.types`` without pulling in the manager.
"""
