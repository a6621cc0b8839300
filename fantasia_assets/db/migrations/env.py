"""Alembic environment: migrates the connection `fantasia_assets.db.migrate` hands over.

Only the tables the platform owns are compared and migrated: a FANTASIA database also holds
PIS's other tables (structures, clusters, …), which are never touched. Our revision is kept in
its own table so a database that another Alembic project (PROTEA, say) also migrates keeps both.
"""

from alembic import context

from fantasia_assets.db.migrate import VERSION_TABLE, include_name
from fantasia_assets.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through `fantasia-assets db upgrade`, which opens the connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_name=include_name,
    compare_type=True,
    compare_server_default=True,
)
with context.begin_transaction():
    context.run_migrations()
