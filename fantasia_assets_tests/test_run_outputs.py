"""`run_outputs.sequences_read_ahead`: the neighbours' sequences read in the background give the
raw rows the same {id: sequence} as asking the cache when they need them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import polars as pl

from fantasia_assets.db.stores import SequenceCache
from fantasia_assets.run_outputs import sequences_read_ahead

SEQUENCES = {1: "MKV", 2: "MA", 5: "MKKL", 9: "M"}


class Recorded:
    """A reads source serving SEQUENCES, recording each fetch."""

    def __init__(self):
        self.fetched: list[list[int]] = []

    def fetch_sequences(self, ids: np.ndarray) -> pl.DataFrame:
        self.fetched.append(sorted(ids.tolist()))
        known = [i for i in ids.tolist() if i in SEQUENCES]
        return pl.DataFrame({"sequence_id": known, "sequence": [SEQUENCES[i] for i in known]})


def test_read_ahead_gives_what_the_cache_gives_and_fetches_once():
    outcome = SimpleNamespace(hits=pl.DataFrame({"ref_idx": [5, 1, 5, 9, 2]}))
    wanted = np.array([9, 1, 5])  # the raw rows name the neighbours with GO terms: a subset
    plain = SequenceCache(None, Recorded())(wanted)
    source = Recorded()
    with ThreadPoolExecutor(1) as background:
        read = sequences_read_ahead(background, SequenceCache(None, source), outcome, whole=True)
        assert read(wanted) == plain
    assert source.fetched == [[1, 2, 5, 9]]  # once, ahead, for every neighbour


def test_an_incremental_partition_reads_nothing_ahead():
    cache = SequenceCache(None, Recorded())
    with ThreadPoolExecutor(1) as background:
        assert sequences_read_ahead(background, cache, SimpleNamespace(hits=None), whole=False) is cache
