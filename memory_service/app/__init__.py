"""The application's assembly: ``runtime`` builds every component in start-up order, ``server`` serves gRPC,
signals and drain, ``loops`` runs the background work. Import the modules themselves; this package imports nothing.
"""
