"""Moving a database from one embedding model to another without starting over (docs/model-migration.md).

``state`` is this instance's view of the generations and the embedders it has for them, ``backfill`` re-embeds
stored memories under a lease, ``gate`` compares the generations' answers, ``admin`` runs the operator's commands.
"""
