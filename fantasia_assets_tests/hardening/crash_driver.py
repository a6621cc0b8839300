"""Run a lookup that kills itself with SIGKILL at a chosen write (used by test_crash_and_disk).

    python -m fantasia_assets_tests.hardening.crash_driver CONFIG MODE

MODE `shards:N` dies during the N-th raw shard file written; `summary` dies after writing half of
summary.csv's temporary file. The database is the one FANTASIA_DATABASE_URL names.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(config_path: str, mode: str) -> None:
    from fantasia_assets import runner
    from fantasia_assets.config import load_config
    from fantasia_assets.core import exports, writers

    if mode.startswith("shards:"):
        limit = int(mode.split(":", 1)[1])
        real_writev = os.writev
        calls = {"n": 0}

        def writev(descriptor, buffers):
            calls["n"] += 1
            if calls["n"] == limit:
                data = b"".join(bytes(b) for b in buffers)
                os.write(descriptor, data[: len(data) // 2])
                _die()
            return real_writev(descriptor, buffers)

        exports.os.writev = writev
    elif mode == "summary":
        real_write_summary = writers.write_summary
        real_write_all = exports._write_all

        def half_then_die(descriptor, data):
            os.write(descriptor, bytes(data[: len(data) // 2]))
            _die()

        def write_summary(*args, **kwargs):
            exports._write_all = half_then_die
            try:
                return real_write_summary(*args, **kwargs)
            finally:
                exports._write_all = real_write_all

        writers.write_summary = write_summary
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    runner.run_lookup(load_config(config_path))
    raise SystemExit("the lookup finished: the kill point was never reached")


if __name__ == "__main__":
    main(*sys.argv[1:])
