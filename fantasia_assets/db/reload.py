"""A reload that changes a reference protein's sequence: its stale embeddings, named and removed.

Embeddings belong to a sequence (`sequence_embeddings.sequence_id`), not to a protein. When a
newer FASTA gives a protein another sequence, the protein moves to a new sequence row and the
vectors of the old one describe a sequence it no longer has. Kept, they would be searched for
a protein they do not describe; left behind, the protein would silently leave the search. The
load removes them (when no other protein still has the old sequence) and its report names the
proteins and the models whose vectors must be loaded again; a load that brings those vectors
in the same command reports nothing missing. All of it runs inside the load's transaction.
"""

from __future__ import annotations

import logging

from .load_report import LoadReport, changed_sequence_lines

_log = logging.getLogger(__name__)


def note_changed_sequences(cursor) -> None:
    """Remember the proteins of this load whose sequence differs from the loaded one.

    Their embeddings were computed from the old sequence: kept, they would describe another
    protein; dropped silently, the protein would vanish from the search without a word. They
    are removed, and the report names the proteins and the models that now lack vectors: those
    the old sequence had, or, when it had none (a change undone by a later load finds the
    vectors already removed), every model some reference protein has vectors of.
    """
    cursor.execute(
        """
        CREATE TEMP TABLE _changed ON COMMIT DROP AS
        SELECT p.id AS protein_id, old.sequence_id AS old_sequence_id
        FROM _protein p JOIN protein old ON old.id = p.id
        JOIN sequence s ON s.sequence_hash = p.sequence_hash
        WHERE old.sequence_id IS DISTINCT FROM s.id
        """
    )
    # the models a protein must have vectors of: its old sequence's; when that one has none (a
    # sequence changed back: the earlier change removed them), every model the references have,
    # so that the protein is not left out of the search without a word the second time
    cursor.execute(
        """
        CREATE TEMP TABLE _changed_types ON COMMIT DROP AS
        SELECT DISTINCT c.protein_id, e.embedding_type_id
        FROM _changed c JOIN sequence_embeddings e ON e.sequence_id = c.old_sequence_id
        UNION
        SELECT c.protein_id, t.id
        FROM _changed c CROSS JOIN sequence_embedding_type t
        WHERE NOT EXISTS (SELECT 1 FROM sequence_embeddings e WHERE e.sequence_id = c.old_sequence_id)
          AND EXISTS (SELECT 1 FROM sequence_embeddings e JOIN protein p ON p.sequence_id = e.sequence_id
                      WHERE e.embedding_type_id = t.id)
        """
    )


def remove_stale_embeddings(cursor, report: LoadReport) -> None:
    """Delete the embeddings of old sequences that no protein has any more (after the protein merge)."""
    cursor.execute("SELECT protein_id FROM _changed ORDER BY protein_id")
    report.changed_sequences = [row[0] for row in cursor.fetchall()]
    cursor.execute(
        """
        DELETE FROM sequence_embeddings e
        USING (SELECT DISTINCT old_sequence_id FROM _changed) c
        WHERE e.sequence_id = c.old_sequence_id
          AND NOT EXISTS (SELECT 1 FROM protein p WHERE p.sequence_id = e.sequence_id)
        """
    )
    report.stale_embeddings = max(cursor.rowcount, 0)


def check_changed_proteins(cursor, report: LoadReport) -> None:
    """Which proteins with a new sequence lack a model's vectors they had (once this load is written)."""
    if not report.changed_sequences:
        return
    cursor.execute(
        """
        SELECT ct.protein_id, t.name
        FROM _changed_types ct
        JOIN protein p ON p.id = ct.protein_id
        JOIN sequence_embedding_type t ON t.id = ct.embedding_type_id
        WHERE NOT EXISTS (SELECT 1 FROM sequence_embeddings e
                          WHERE e.sequence_id = p.sequence_id
                            AND e.embedding_type_id = ct.embedding_type_id)
        ORDER BY 1, 2
        """
    )
    report.without_embeddings = [(protein, model) for protein, model in cursor.fetchall()]
    # the load report prints these lines (the CLI); the log repeats them only for -v
    _log.info("%s", "; ".join(changed_sequence_lines(report)))
