"""Alembic migrations for the journal (shipped inside the package as `engine.migrations`)."""
