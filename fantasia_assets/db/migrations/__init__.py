"""Alembic migrations of the reference schema, shipped in the package (run by `db.migrate`)."""
