"""Benchmark: load the full shared human reference set into a fresh embedded database.

    .venv/bin/python bench/load.py [--shared ../shared/data] [--with-antiberty]

Prints the loader's own account, total time, rows per second for embeddings and annotations
(each over the time of its own write stage, and embeddings also including the HDF5 scan), the
database size, and the time of an identical second load (which must write nothing). Target:
≥ 20,000 embedding rows/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--with-antiberty", action="store_true", help="also load the AntiBERTy references")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fa-bench-load-"))
    os.environ["FANTASIA_HOME"] = str(home)
    os.environ.pop("FANTASIA_DATABASE_URL", None)

    import sqlalchemy as sa

    from fantasia_assets.db import get_engine
    from fantasia_assets.db.loader import load_references

    data = args.shared
    loads = [("NEAR", data / "reference_human.h5")]
    if args.with_antiberty:
        loads.append(("AntiBERTy", data / "reference_human_antiberty.h5"))
    try:
        engine = get_engine()
        reports = []
        started = time.perf_counter()
        for model, h5 in loads:
            reports.append(
                load_references(
                    engine,
                    fasta=data / "sequences.fasta.gz",
                    gaf=[data / "goa_human.gaf.gz"],
                    obo=data / "go-basic.obo.gz",
                    embeddings=h5,
                    model=model,
                )
            )
        total = time.perf_counter() - started
        for report in reports:
            print("\n".join(report.lines()))
        with engine.connect() as conn:
            size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
        started = time.perf_counter()
        again = [
            load_references(
                engine, fasta=data / "sequences.fasta.gz", gaf=[data / "goa_human.gaf.gz"],
                obo=data / "go-basic.obo.gz", embeddings=h5, model=model,
            )
            for model, h5 in loads
        ]  # fmt: skip
        second = time.perf_counter() - started
        rows = sum(r.embedding_rows for r in reports)
        write = sum(r.timings["write embeddings"] for r in reports)
        scan = sum(r.timings["scan HDF5"] for r in reports)
        annotations = reports[0].annotations.inserted
        annotation_time = reports[0].timings["write proteins+annotations"]
        rewritten = sum(c.inserted + c.updated for r in again for c in r.embeddings_by_layer.values())
        print()
        print(f"total_load_seconds={total:.2f}")
        print(f"second_identical_load_seconds={second:.2f} rows_rewritten={rewritten}")
        print(f"database_size_MiB={size / 2**20:.1f}")
        print(f"annotation_rows_per_s={annotations / annotation_time:,.0f} ({annotations:,} rows)")
        print(f"embedding_rows_per_s_write={rows / write:,.0f} ({rows:,} rows)")
        print(f"embedding_rows_per_s_scan_and_write={rows / (write + scan):,.0f}")
    finally:
        from fantasia_assets.db.embedded import embedded_server
        from fantasia_assets.db.engine import dispose_engines

        dispose_engines()
        embedded_server().cleanup()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
