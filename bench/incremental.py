"""Benchmark: an incremental rerun against a full run, in the same process, for two changes.

    .venv/bin/python bench/incremental.py                  # 20,000 × 124,000 × 1,024, k = 5
    .venv/bin/python bench/incremental.py --queries 2000 --references 12400   # a quicker look

Data: ``../shared/tools/synth_scale.py --plain`` (as `bench/scale.py`), loaded with COPY into a
fresh embedded database, all but the last ``--added`` references first. One full lookup (alignment
off) writes the outputs and their incremental state. Then, for each change:

1. ``--added`` more references (the held-back rows, with their annotations);
2. a newer annotation release that trims ``--trim`` of the proteins to their first annotation
   (what loading such a GAF does to the annotation table, applied in SQL);

the rerun in the same experiment_path (incremental) and a full run in a fresh experiment_path
are timed one after the other, both with the reference matrix already in the local cache (the
fetch from PostgreSQL is the same for both and is not what this measures; so is the annotation
table's: the newer table is cached before either run). Every output but the
lineage log and the state must be identical. Target: incremental ≤ 0.25 × full for each.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookup import AMINO, insert_references
from scale import SYNTH, generate


def digests(root: Path) -> dict[str, str]:
    """Every output but the lineage log and the incremental state."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lineage.duckdb" and p.relative_to(root).parts[0] != "state"
    }


def add_references(engine, vectors: np.ndarray, first_id: int, terms: int, rng) -> None:
    """Insert more references like `lookup.insert_references` does, ids from `first_id`."""
    from fantasia_assets.db import halfvec

    with engine.connect() as conn:
        go_ids = [row[0] for row in conn.exec_driver_sql("SELECT go_id FROM go_terms ORDER BY go_id")]
    ids = np.arange(first_id, first_id + len(vectors))
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy("COPY sequence (id, sequence, sequence_hash) FROM STDIN") as copy:
            for i in ids.tolist():
                sequence = AMINO[rng.integers(0, 20, int(rng.integers(100, 600)))].tobytes().decode()
                copy.write_row((i, sequence, hashlib.md5(sequence.encode()).hexdigest()))
        with cursor.copy(
            "COPY protein (id, sequence_id, gene_name, organism, taxonomy_id) FROM STDIN"
        ) as copy:
            for i in ids.tolist():
                copy.write_row((f"P{i:07d}", i, f"G{i}", "Homo sapiens", "9606"))
        with cursor.copy(
            "COPY protein_go_term_annotation (protein_id, go_id, evidence_code) FROM STDIN"
        ) as copy:
            for i in ids.tolist():
                for go in sorted(set(rng.integers(0, len(go_ids), terms).tolist())):
                    copy.write_row((f"P{i:07d}", go_ids[go], "EXP"))
        cursor.execute("CREATE TEMP TABLE _e (sequence_id int4, embedding halfvec) ON COMMIT DROP")
        with cursor.copy("COPY _e FROM STDIN (FORMAT binary)") as copy:
            copy.write(halfvec.encode(ids, vectors))
        cursor.execute(
            "INSERT INTO sequence_embeddings (sequence_id, embedding_type_id, layer_index, embedding, shape) "
            "SELECT sequence_id, 1, 0, embedding, ARRAY[%s] FROM _e",
            (vectors.shape[1],),
        )


def trim_annotations(engine, fraction: float, rng) -> int:
    """Keep only the first annotation (by GO id) of `fraction` of the annotated proteins."""
    with engine.begin() as conn:
        proteins = [row[0] for row in conn.exec_driver_sql(
            "SELECT DISTINCT protein_id FROM protein_go_term_annotation ORDER BY protein_id"
        )]  # fmt: skip
        chosen = sorted(rng.choice(proteins, max(1, int(len(proteins) * fraction)), replace=False).tolist())
        conn.exec_driver_sql(
            "DELETE FROM protein_go_term_annotation a WHERE a.protein_id = ANY(%(p)s) AND a.go_id > "
            "(SELECT min(go_id) FROM protein_go_term_annotation b WHERE b.protein_id = a.protein_id)",
            {"p": chosen},
        )
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--references", type=int, default=124_000, help="before the change")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--added", type=int, default=2500)
    parser.add_argument("--trim", type=float, default=0.02)
    parser.add_argument("--synth", type=Path, default=SYNTH, help="path of synth_scale.py")
    parser.add_argument("--data", type=Path, help="a directory synth_scale.py --plain already wrote")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fa-bench-incremental-"))
    os.environ["FANTASIA_HOME"] = str(work / "home")
    os.environ.pop("FANTASIA_DATABASE_URL", None)

    from fantasia_assets.config import parse_config
    from fantasia_assets.db import get_engine, schema_ready
    from fantasia_assets.db.embedded import embedded_server
    from fantasia_assets.db.engine import dispose_engines
    from fantasia_assets.db.stores import ReferenceStore
    from fantasia_assets.paths import cache_dir
    from fantasia_assets.runner import plan_partitions, reference_scope, run_lookup

    rng = np.random.default_rng(0)
    try:
        started = time.perf_counter()
        data = args.data or work / "synth"
        if args.data is None:
            generate(args.synth, data, args.references + args.added, args.queries, args.dim)
        print(f"synthetic data: {time.perf_counter() - started:.1f} s")
        references = np.load(data / "ref_emb.npy").astype(np.float16)
        if len(references) < args.references + args.added:
            # a --data folder made for another size would add no reference and time nothing
            raise SystemExit(
                f"{data / 'ref_emb.npy'} holds {len(references)} references; this run needs "
                f"--references + --added = {args.references + args.added}"
            )
        engine = get_engine()
        schema_ready(engine)
        insert_references(engine, references[: args.references], 5, rng)

        def config(name: str):
            return parse_config(
                {
                    "experiment_path": str(work / name),
                    "embeddings_path": str(data / "queries.h5"),
                    "limit_per_entry": args.k,
                    "lookup": {"use_gpu": False, "batch_size": args.queries},
                    "embedding": {"models": {"Synthetic": {"layer_index": [0]}}},
                    "postprocess": {"alignment": False},
                }
            )

        def timed_run(name: str, **kwargs):
            started = time.perf_counter()
            result = run_lookup(config(name), engine, **kwargs)
            return time.perf_counter() - started, result

        def warm_matrix() -> None:
            """The matrix and the annotation table into the local caches, so that neither timed
            run fetches them (the full run would otherwise find the table the incremental one
            fetched); and, as a lookup does, the cache stamp's reference sequence file
            (`db.snapshot`), which the first lookup after a change writes, whichever kind it is."""
            from fantasia_assets.core.plan import open_queries
            from fantasia_assets.core.references import ReferenceScope
            from fantasia_assets.db.snapshot import LiveReads
            from fantasia_assets.db.stores import AnnotationStore

            queries = open_queries(data / "queries.h5", cache_dir("queries"))
            reads = LiveReads(engine)
            with reads.snapshot():
                for partition in plan_partitions(config("x"), queries, reads.model_types()):
                    scope = reference_scope(config("x"), partition)
                    ReferenceStore(None, cache_dir("references"), source=reads).get(scope)
                include, exclude = config("x").taxonomy.resolve()
                AnnotationStore(None, cache_dir("annotations"), reads).get(
                    ReferenceScope(0, None, include, exclude)
                )
                reads.finish()

        seconds, _ = timed_run("incremental")
        print(f"first full run (database fetch, state written): {seconds:.2f} s")
        changes = [
            (f"+{args.added} references", lambda: add_references(
                engine, references[args.references:], args.references + 1, 5, rng)),
            (f"annotations of {args.trim:.0%} of proteins trimmed", lambda: trim_annotations(engine, args.trim, rng)),
        ]  # fmt: skip
        for number, (change, apply) in enumerate(changes):
            apply()
            warm_matrix()
            incremental_seconds, result = timed_run("incremental")
            update = result.updates["Synthetic|layer_0"]
            full_seconds, _ = timed_run(f"full-{number}", full=True)
            same = digests(work / "incremental") == digests(work / f"full-{number}")
            print(f"--- {change}")
            print(f"incremental ({update.kind}: {update.searched} queries searched, {update.merged} merged, "
                  f"outputs of {update.details.get('outputs_rebuilt', 'all')} rebuilt): "
                  f"{incremental_seconds:.2f} s")  # fmt: skip
            stages = {s: round(v, 2) for s, v in result.partitions[0].timings.items()}
            print(
                f"  partition stages: {stages}; run-wide: { {s: round(v, 2) for s, v in result.timings.items()} }"
            )
            print(f"full run: {full_seconds:.2f} s")
            print(f"incremental_over_full={incremental_seconds / full_seconds:.3f} (target <= 0.25)")
            print(f"outputs_identical={same}")
    finally:
        dispose_engines()
        embedded_server().cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
