"""Taxonomy filters: id validation, nodes.dmp reading (plain and gzip), descendant expansion."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fantasia_assets.core.taxonomy import (
    TaxonomyError,
    TaxonomyFilter,
    TaxonomyTree,
    descendants,
    read_nodes,
    validate_taxon_ids,
)

# (tax_id, parent, rank): a small tree in NCBI's shape, the root being its own parent.
EDGES = [
    (1, 1, "no rank"),
    (2, 1, "superkingdom"),
    (10, 2, "genus"),
    (11, 10, "species"),
    (12, 10, "species"),
    (2759, 1, "superkingdom"),
    (9606, 2759, "species"),
    (63221, 9606, "subspecies"),
    (10090, 2759, "species"),
    (10091, 10090, "subspecies"),
    (99, 5000, "species"),  # parent missing from the dump, as in a partial extract
]


def _nodes_text() -> str:
    # The real layout: fields joined by "\t|\t", each line closed by "\t|".
    return "".join(
        f"{tax_id}\t|\t{parent}\t|\t{rank}\t|\t\t|\t0\t|\t1\t|\t11\t|\n" for tax_id, parent, rank in EDGES
    )


@pytest.fixture(params=["plain", "gzip"])
def nodes_path(request, tmp_path: Path) -> Path:
    if request.param == "plain":
        path = tmp_path / "nodes.dmp"
        path.write_text(_nodes_text())
    else:
        path = tmp_path / "nodes.dmp.gz"
        path.write_bytes(gzip.compress(_nodes_text().encode()))
    return path


def test_read_nodes_builds_parents_and_children(nodes_path: Path) -> None:
    tree = read_nodes(nodes_path)
    assert len(tree) == len(EDGES)
    parent_of = {
        int(tree.tax_ids[i]): (int(tree.tax_ids[p]) if p >= 0 else None) for i, p in enumerate(tree.parents)
    }
    assert parent_of[1] is None  # self-parent of the root is not an edge
    assert parent_of[99] is None  # parent 5000 is not in the dump
    assert parent_of[63221] == 9606
    position = int(np.searchsorted(tree.tax_ids, 10))
    children = tree.children[tree.children_indptr[position] : tree.children_indptr[position + 1]]
    assert sorted(int(tree.tax_ids[c]) for c in children) == [11, 12]


def test_descendants_include_the_taxa_and_everything_below(nodes_path: Path) -> None:
    tree = read_nodes(nodes_path)
    assert descendants(["2759"], tree) == {"2759", "9606", "63221", "10090", "10091"}
    assert descendants(["10", "9606"], tree) == {"10", "11", "12", "9606", "63221"}
    assert descendants(["11"], tree) == {"11"}
    assert descendants(["1"], tree) == {str(t) for t, _, _ in EDGES if t != 99}
    assert descendants([], tree) == frozenset()


def test_unknown_taxa_are_kept_without_descendants(nodes_path: Path, caplog) -> None:
    tree = read_nodes(nodes_path)
    assert descendants(["424242", "10090"], tree) == {"424242", "10090", "10091"}
    assert "424242" in caplog.text


def test_descendants_walk_a_deep_chain_without_recursion() -> None:
    depth = 5000  # far beyond Python's default recursion limit
    ids = np.arange(1, depth + 1)
    tree = TaxonomyTree.from_edges(ids, np.maximum(ids - 1, 1))
    assert len(descendants(["1"], tree)) == depth
    assert descendants([str(depth - 1)], tree) == {str(depth - 1), str(depth)}


def test_filter_without_descendants_uses_the_lists_as_given() -> None:
    include, exclude = TaxonomyFilter(exclude=(9606,), include_only=("2759", "10090")).resolve()
    assert include == {"2759", "10090"}
    assert exclude == {"9606"}
    assert TaxonomyFilter().resolve() == (None, frozenset())


def test_filter_with_descendants_expands_both_lists(nodes_path: Path) -> None:
    taxonomy = TaxonomyFilter(
        exclude=("9606",), include_only=(2759,), get_descendants=True, nodes_path=nodes_path
    )
    include, exclude = taxonomy.resolve()
    assert include == {"2759", "9606", "63221", "10090", "10091"}
    assert exclude == {"9606", "63221"}
    bacteria = TaxonomyFilter(exclude=("2",), get_descendants=True, nodes_path=nodes_path)
    assert bacteria.resolve() == (None, frozenset({"2", "10", "11", "12"}))


def test_get_descendants_needs_a_readable_dump(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="get_descendants"):
        TaxonomyFilter(exclude=("9606",), get_descendants=True).resolve()
    missing = tmp_path / "absent" / "nodes.dmp"
    with pytest.raises(TaxonomyError, match=str(missing)):
        TaxonomyFilter(exclude=("9606",), get_descendants=True, nodes_path=missing).resolve()
    not_nodes = tmp_path / "names.csv"
    not_nodes.write_text("taxon,name\n9606,human\n")
    with pytest.raises(TaxonomyError, match=r"names\.csv"):
        TaxonomyFilter(exclude=("9606",), get_descendants=True, nodes_path=not_nodes).resolve()


def test_duplicate_taxa_in_the_dump_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "nodes.dmp"
    path.write_text(_nodes_text() + "9606\t|\t1\t|\tspecies\t|\n")
    with pytest.raises(TaxonomyError, match="9606"):
        read_nodes(path)


def test_taxon_ids_are_normalised() -> None:
    assert validate_taxon_ids([9606, "10090", " 0042 ", np.int64(7), 9606], "k") == (
        "9606",
        "10090",
        "42",
        "7",
    )
    assert validate_taxon_ids(None, "k") == ()
    assert validate_taxon_ids(9606, "k") == ("9606",)


@pytest.mark.parametrize(
    "hostile",
    ["1) OR 1=1 --", "abc", "-9606", -9606, 96.06, 9606.0, "9606.0", "", "0", True, None, "٣"],
)
def test_hostile_taxon_ids_are_rejected_with_the_key(hostile) -> None:
    with pytest.raises(TaxonomyError, match=r"lookup\.taxonomy\.exclude") as raised:
        TaxonomyFilter(exclude=("9606", hostile))
    assert repr(hostile) in str(raised.value)
    with pytest.raises(TaxonomyError, match=r"lookup\.taxonomy\.include_only"):
        TaxonomyFilter(include_only=[hostile])
