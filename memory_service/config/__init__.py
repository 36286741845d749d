"""Settings: ``settings`` holds the frozen ``Settings`` read from the environment, ``env`` the parsers it reads with.

Import the modules themselves (``memory_service.config.settings``); this package imports nothing.
"""
