"""Benchmark: our vectorised halfvec COPY codec (`db.halfvec`) against pgvector-python's.

    .venv/bin/python bench/halfvec_codec.py [--rows 20000] [--dim 1024] [--repeats 3]

pgvector-python encodes and decodes one `HalfVector` at a time (`to_binary`/`from_binary`);
a COPY stream built with it needs a Python loop over rows for the record framing too. Both
codecs produce the same bytes (checked here); the issue's rule: use pgvector's when it is
within 10 % of ours, else keep ours and record the measurement in `db/halfvec.py`.
"""

from __future__ import annotations

import argparse
import struct
import time

import numpy as np
from pgvector import HalfVector

from fantasia_assets.db import halfvec

_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)


def pgvector_encode(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    parts = [_HEADER]
    for sequence_id, vector in zip(ids.tolist(), vectors, strict=True):
        value = HalfVector(vector).to_binary()
        parts.append(struct.pack(">hiii", 2, 4, sequence_id, len(value)) + value)
    parts.append(_TRAILER)
    return b"".join(parts)


def pgvector_decode(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    view = memoryview(payload)
    offset, ids, rows = len(_HEADER), [], []
    while True:
        (fields,) = struct.unpack_from(">h", view, offset)
        if fields == -1:
            break
        _, sequence_id, length = struct.unpack_from(">iii", view, offset + 2)
        start = offset + 14
        rows.append(HalfVector.from_binary(view[start : start + length]).to_numpy())
        ids.append(sequence_id)
        offset = start + length
    return np.asarray(ids, dtype=np.int64), np.ascontiguousarray(np.stack(rows), dtype=np.float16)


def best_of(repeats: int, function, *args) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = np.arange(1, args.rows + 1, dtype=np.int64)
    vectors = rng.standard_normal((args.rows, args.dim)).astype(np.float16)

    ours_encode, ours_payload = best_of(args.repeats, halfvec.encode, ids, vectors)
    theirs_encode, theirs_payload = best_of(args.repeats, pgvector_encode, ids, vectors)
    assert ours_payload == theirs_payload, "the two encoders disagree"
    ours_decode, (ours_ids, ours_vectors) = best_of(args.repeats, halfvec.decode, ours_payload)
    theirs_decode, (theirs_ids, theirs_vectors) = best_of(args.repeats, pgvector_decode, ours_payload)
    assert np.array_equal(ours_ids, theirs_ids)
    assert np.array_equal(ours_vectors.view(np.uint16), theirs_vectors.view(np.uint16))

    print(f"{args.rows} rows × {args.dim} dims ({len(ours_payload) / 2**20:.1f} MiB), best of {args.repeats}")
    print(f"encode: ours {ours_encode * 1e3:8.1f} ms   pgvector {theirs_encode * 1e3:8.1f} ms   "
          f"ratio {theirs_encode / ours_encode:6.1f}×")  # fmt: skip
    print(f"decode: ours {ours_decode * 1e3:8.1f} ms   pgvector {theirs_decode * 1e3:8.1f} ms   "
          f"ratio {theirs_decode / ours_decode:6.1f}×")  # fmt: skip


if __name__ == "__main__":
    main()
