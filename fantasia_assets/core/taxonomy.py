"""Taxonomy filters on references (SPEC §3.2): exclude and include-only lists, with descendants.

`lookup.taxonomy: {exclude: [], include_only: [], get_descendants: false}`. The original
expanded descendants through an online NCBI service and so shipped with it disabled; here the
expansion is offline, from an NCBI taxonomy dump's `nodes.dmp` (plain or gzip), read with
polars and walked breadth-first over a children index in numpy, level by level, so the full
dump (~2.6 million taxa) is no slower to expand than a small one is to read.
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets.errors import FantasiaError

log = logging.getLogger(__name__)

_TAXON_ID = re.compile(r"[0-9]+")
_EXCLUDE_KEY = "lookup.taxonomy.exclude"
_INCLUDE_KEY = "lookup.taxonomy.include_only"


class TaxonomyError(FantasiaError, ValueError):
    """A taxonomy setting or dump cannot be used; the message names the key or the file."""


def validate_taxon_ids(values: object, key: str) -> tuple[str, ...]:
    """Normalise configured taxon ids to canonical digit strings ("09606" → "9606").

    Accepts None (no ids), one id, or an iterable of ids, each an integer or a string of
    ASCII digits (surrounding whitespace ignored); duplicates are dropped, order kept.
    Anything else — words, signs, floats, SQL fragments, 0 — raises `TaxonomyError` naming
    `key` and the value, because these ids end up in queries against the reference database.
    """
    if values is None:
        return ()
    if isinstance(values, (str, bytes, numbers.Number)):
        values = [values]
    if not isinstance(values, Iterable):
        raise TaxonomyError(f"{key} must be a list of NCBI taxon ids, got {values!r}")
    normalised: dict[str, None] = {}
    for value in values:
        normalised[_taxon_id(value, key)] = None
    return tuple(normalised)


def _taxon_id(value: object, key: str) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str) and _TAXON_ID.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise TaxonomyError(f"{key}: {value!r} is not an NCBI taxon id (a positive integer such as 9606)")
    if number < 1:
        raise TaxonomyError(f"{key}: {value!r} is not an NCBI taxon id (ids start at 1)")
    return str(number)


@dataclass(frozen=True)
class TaxonomyTree:
    """The NCBI taxonomy as arrays: taxon ids sorted, with parents and a children index.

    `tax_ids` is int64, ascending and unique; `parents[i]` is the position in `tax_ids` of
    the parent of `tax_ids[i]` (-1 for the root, whose parent is itself in `nodes.dmp`, and
    for taxa whose parent is absent from the dump). The children of position `i` are
    `children[children_indptr[i]:children_indptr[i + 1]]`, positions again (CSR).
    """

    tax_ids: np.ndarray
    parents: np.ndarray
    children_indptr: np.ndarray
    children: np.ndarray

    @classmethod
    def from_edges(cls, tax_ids: np.ndarray, parent_ids: np.ndarray) -> TaxonomyTree:
        """Build from parallel arrays of (taxon id, parent taxon id); taxon ids must be unique."""
        tax_ids = np.asarray(tax_ids, dtype=np.int64)
        parent_ids = np.asarray(parent_ids, dtype=np.int64)
        order = np.argsort(tax_ids, kind="stable")
        tax_ids, parent_ids = tax_ids[order], parent_ids[order]
        duplicated = tax_ids[1:][tax_ids[1:] == tax_ids[:-1]]
        if len(duplicated):
            raise TaxonomyError(f"taxon {int(duplicated[0])} is listed more than once")
        found = np.minimum(np.searchsorted(tax_ids, parent_ids), len(tax_ids) - 1)
        known = tax_ids[found] == parent_ids
        positions = np.arange(len(tax_ids), dtype=np.int64)
        # The root names itself as parent: as an edge it would make the walk revisit it forever.
        parents = np.where(known & (found != positions), found, -1).astype(np.int64)
        has_parent = np.flatnonzero(parents >= 0)
        by_parent = has_parent[np.argsort(parents[has_parent], kind="stable")]
        counts = np.bincount(parents[has_parent], minlength=len(tax_ids))
        indptr = np.zeros(len(tax_ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(tax_ids, parents, indptr, by_parent.astype(np.int64))

    def __len__(self) -> int:
        return len(self.tax_ids)

    def positions(self, taxa: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Positions (int64) of the given digit-string taxon ids, and the ids the tree lacks."""
        wanted = list(dict.fromkeys(taxa))
        if not len(self):
            return np.empty(0, dtype=np.int64), wanted
        ids = np.array([int(t) for t in wanted], dtype=np.int64)
        found = np.minimum(np.searchsorted(self.tax_ids, ids), len(self) - 1)
        present = self.tax_ids[found] == ids
        unknown = [t for t, ok in zip(wanted, present.tolist(), strict=True) if not ok]
        return found[present].astype(np.int64), unknown


def read_nodes(path: Path) -> TaxonomyTree:
    """Read an NCBI `nodes.dmp` (plain or gzip) into a `TaxonomyTree`.

    Lines look like `tax_id\\t|\\tparent tax_id\\t|\\trank\\t|\\t…\\t|`; only the first two
    fields are used. Raises `TaxonomyError` naming the file when it is missing, unreadable,
    or not in this format.
    """
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"taxonomy dump {path} does not exist or is not a file")
    try:
        # Splitting on the tab alone leaves the '|' separators as columns 1, 3, …: the
        # first three columns are then (tax_id, '|', parent).
        frame = pl.read_csv(
            path,
            separator="\t",
            has_header=False,
            quote_char=None,
            columns=[0, 1, 2],
            infer_schema=False,
            truncate_ragged_lines=True,
        )
        frame.columns = ["tax_id", "bar", "parent"]
    except OSError as error:
        raise TaxonomyError(f"cannot read taxonomy dump {path}: {error}") from error
    except pl.exceptions.PolarsError as error:
        # polars appends its query plan to the message: the first line is the reason.
        reason = str(error).splitlines()[0]
        raise TaxonomyError(
            f"taxonomy dump {path} is not an NCBI nodes.dmp (tab-separated, "
            f"'tax_id<TAB>|<TAB>parent tax_id<TAB>|…'): {reason}"
        ) from error
    if frame.height == 0:
        raise TaxonomyError(f"taxonomy dump {path} is empty")
    typed = frame.select(
        pl.col("tax_id").str.strip_chars().cast(pl.Int64, strict=False),
        pl.col("parent").str.strip_chars().cast(pl.Int64, strict=False),
        (pl.col("bar") == "|").alias("separated"),
    )
    malformed = typed.with_row_index("line").filter(
        pl.col("tax_id").is_null() | pl.col("parent").is_null() | ~pl.col("separated").fill_null(False)
    )
    if malformed.height:
        line = int(malformed["line"][0]) + 1
        raise TaxonomyError(
            f"taxonomy dump {path} is not an NCBI nodes.dmp: line {line} does not start "
            "with 'tax_id<TAB>|<TAB>parent tax_id'"
        )
    try:
        return TaxonomyTree.from_edges(typed["tax_id"].to_numpy(), typed["parent"].to_numpy())
    except TaxonomyError as error:
        raise TaxonomyError(f"taxonomy dump {path}: {error}") from error


def descendants(taxa: Iterable[str], nodes: TaxonomyTree) -> frozenset[str]:
    """The given taxa plus every taxon below them in `nodes`.

    Taxa the tree does not know are kept (they may still label references) and logged.
    """
    taxa = validate_taxon_ids(list(taxa), "descendants() taxa")
    start, unknown = nodes.positions(taxa)
    if unknown:
        log.warning("taxa not in the taxonomy dump, kept without descendants: %s", unknown[:20])
    reached = np.zeros(len(nodes), dtype=bool)
    reached[start] = True
    frontier = np.unique(start)
    while len(frontier):
        begins = nodes.children_indptr[frontier]
        counts = nodes.children_indptr[frontier + 1] - begins
        total = int(counts.sum())
        if total == 0:
            break
        # All children of the frontier at once: each parent's run of the CSR, concatenated.
        shift = np.repeat(begins - (np.cumsum(counts) - counts), counts)
        children = nodes.children[np.arange(total, dtype=np.int64) + shift]
        frontier = children[~reached[children]]
        reached[frontier] = True
    found = nodes.tax_ids[reached].astype(str).tolist()
    return frozenset(found).union(taxa)


@dataclass(frozen=True)
class TaxonomyFilter:
    """Which reference taxa the lookup may use (SPEC §3.2).

    `exclude` and `include_only` hold NCBI taxon ids, validated and normalised on
    construction (ints or digit strings). An empty `include_only` means every taxon.
    `get_descendants` widens both lists to all taxa below them, read from `nodes_path`
    (an NCBI `nodes.dmp`, plain or gzip).
    """

    exclude: tuple[str, ...] = ()
    include_only: tuple[str, ...] = ()
    get_descendants: bool = False
    nodes_path: Path | None = None

    def __post_init__(self) -> None:
        exclude = validate_taxon_ids(self.exclude, _EXCLUDE_KEY)
        include_only = validate_taxon_ids(self.include_only, _INCLUDE_KEY)
        object.__setattr__(self, "exclude", exclude)
        object.__setattr__(self, "include_only", include_only)
        if not isinstance(self.get_descendants, bool):
            raise TaxonomyError(
                f"lookup.taxonomy.get_descendants must be true or false, got {self.get_descendants!r}"
            )
        if self.nodes_path is not None:
            object.__setattr__(self, "nodes_path", Path(self.nodes_path))

    def resolve(self) -> tuple[frozenset[str] | None, frozenset[str]]:
        """(taxa to include, or None for every taxon; taxa to exclude), descendants expanded.

        Raises `TaxonomyError` when `get_descendants` is set without `nodes_path`, or when
        that file is missing, unreadable or malformed.
        """
        if not self.get_descendants:
            include = frozenset(self.include_only) if self.include_only else None
            return include, frozenset(self.exclude)
        if self.nodes_path is None:
            raise TaxonomyError(
                "lookup.taxonomy.get_descendants needs an NCBI taxonomy dump: set nodes_path "
                "to nodes.dmp (from https://ftp.ncbi.nlm.nih.gov/pub/taxonomy/taxdump.tar.gz)"
            )
        if not self.nodes_path.is_file():
            raise TaxonomyError(f"taxonomy dump {self.nodes_path} does not exist or is not a file")
        if not self.include_only and not self.exclude:
            return None, frozenset()
        tree = read_nodes(self.nodes_path)
        include = descendants(self.include_only, tree) if self.include_only else None
        return include, descendants(self.exclude, tree)
