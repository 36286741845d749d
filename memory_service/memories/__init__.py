"""Memories: the write and read path.

``store`` (Store, Get, List, Delete), ``ingest`` (the BulkStore pipeline), ``binding`` (the database's embedding
model), ``validation`` (input rules), ``stats`` (what an operator sees) and ``purge`` (expired rows and old cache
entries). Import the modules themselves; this package imports nothing.
"""
