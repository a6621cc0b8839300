"""The template reader of many groups at once (core/h5bulk.py) gives, group by group, exactly what
the per-group parse (`FastLayout.group`) gives, hence the plain h5py scan's catalogue: on files of
many groups, on irregular ones (mixed layouts, attributes present or not, odd names, fixed and
variable-length strings, modification times), and with a damaged group in the middle; in the 1.8
format (version-2 headers, checksums) and in h5py's default one (version-1 headers, symbol
tables: `h5tables`)."""

from __future__ import annotations

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from fantasia_assets.core import h5bulk, h5fast, queries  # noqa: E402
from fantasia_assets.core.h5bits import LAYOUT, checksum_routine, link_address  # noqa: E402
from fantasia_assets.core.sequences import clean, clean_many  # noqa: E402
from fantasia_assets_tests.core.test_h5fast import _assert_same, _outcome, _plain_scan  # noqa: E402

RESIDUES = list("ACDEFGHIKLMNPQRSTVWY")
# the 1.8 format, and h5py's default (the earliest the library writes: FANTASIA's query files)
FORMATS = {"v108": ("v108", "v108"), "default": None}


def _regular_file(path, count: int, dim: int = 4, libver=FORMATS["v108"]) -> None:
    rng = np.random.default_rng(3)
    with h5py.File(path, "w", libver=libver) as out:
        for i in range(count):
            group = out.create_group(f"accession_P{i:05d}")
            sequence = "".join(rng.choice(RESIDUES, int(rng.integers(5, 40))))
            group.create_dataset("sequence", data=sequence, dtype=h5py.string_dtype())
            group.create_dataset("type_1/layer_0/embedding", data=rng.standard_normal(dim).astype("<f4"))


def _irregular_file(path, count: int, libver=FORMATS["v108"]) -> None:
    """Groups of several layouts, in runs and interleaved, with what may differ between them."""
    rng = np.random.default_rng(7)
    with h5py.File(path, "w", libver=libver) as out:
        for i in range(count):
            name = f"accession_Q{i:04d}" + ("|a b" if i % 7 == 0 else "") + ("é→" if i % 11 == 0 else "")
            group = out.create_group(name)
            sequence = "".join(rng.choice(RESIDUES, int(rng.integers(1, 50))))
            if i % 13 == 0:
                sequence = sequence.lower() + " 12-."  # what `clean` changes
            if i % 29 == 0:
                sequence = sequence + "é"
            if i % 17 == 0:
                fixed = h5py.string_dtype("utf-8", len(sequence.encode()))
                group.create_dataset("sequence", data=sequence.encode(), dtype=fixed)
            elif i % 31 == 0:
                group.create_dataset("sequence", data="", dtype=h5py.string_dtype())
            elif i % 37 != 0:  # else: no sequence at all
                group.create_dataset("sequence", data=sequence, dtype=h5py.string_dtype())
            if i % 5 == 0:
                group.attrs["note"] = f"n{i:04d}"  # present or not, values of one size
            if i % 9 == 0:
                group.attrs["size"] = "x" * (i % 4 + 1)  # values of several sizes
            dtype = "<f8" if (i // 40) % 2 else "<f4"
            dim = 8 if i % 19 == 0 else 16
            times = i % 8 == 0
            if i % 4 == 3:
                paths = ["type_1/embedding"]
            elif i % 6 == 0:
                paths = ["type_1/layer_0/embedding", "type_1/layer_2/embedding", "type_2/layer_0/embedding"]
            else:
                paths = ["type_1/layer_0/embedding"]
            for where in paths:
                data = rng.standard_normal(dim).astype(dtype)
                group.create_dataset(where, data=data, track_times=times)
            if i % 23 == 0:
                group.create_dataset("extra", data=[i])
        out["accession_alias"] = out["accession_Q0001"]  # one group under two names


def _addresses(path) -> list[int | None]:
    with h5py.File(path, "r") as handle:
        return [link_address(handle.id, name) for name in handle]


def _per_group(path, addresses):
    with h5fast.FastLayout.open(path) as layout:
        return [layout.group(address) if address is not None else None for address in addresses]


def _bulk(path, addresses, monkeypatch) -> tuple[list, int]:
    """`FastLayout.groups` of the addresses, and how many groups it left to `FastLayout.group`."""
    calls = []
    original = h5fast.FastLayout.group
    with monkeypatch.context() as patch:
        patch.setattr(h5fast.FastLayout, "group", lambda self, a: calls.append(a) or original(self, a))
        with h5fast.FastLayout.open(path) as layout:
            found = layout.groups(addresses[:200]) + layout.groups(addresses[200:])  # templates kept
    return found, len(calls)


@pytest.mark.parametrize("form", FORMATS)
def test_many_regular_groups__decoded_together_as_one_by_one(tmp_path, monkeypatch, form):
    path = tmp_path / "regular.h5"
    _regular_file(path, 700, libver=FORMATS[form])
    addresses = _addresses(path)
    found, one_by_one = _bulk(path, addresses, monkeypatch)
    assert found == _per_group(path, addresses)
    assert None not in found and one_by_one == 1  # the template's own group
    _assert_same(queries.scan(path, workers=1), _plain_scan(path, monkeypatch))


def test_default_format__a_table_of_several_symbol_nodes_is_templated_too(tmp_path, monkeypatch):
    """h5py's default format: a type group of 12 layers lists its members in more than one
    symbol node (each holds at most 2 × 4 by default), every node a block of the template."""
    path = tmp_path / "layers.h5"
    rng = np.random.default_rng(11)
    with h5py.File(path, "w") as out:
        for i in range(400):  # 200 and 200 (`_bulk`): a template for each call
            group = out.create_group(f"accession_L{i:04d}")
            group.create_dataset("sequence", data="ACDE" * (i % 9 + 1), dtype=h5py.string_dtype())
            for layer in range(12):
                group.create_dataset(
                    f"type_1/layer_{layer}/embedding", data=rng.standard_normal(4).astype("<f4")
                )
    addresses = _addresses(path)
    with h5fast.FastLayout.open(path) as layout:
        type_group = layout._links(layout._header(addresses[0]))[b"type_1"]
        body = next(body for kind, body, _ in layout._header(type_group) if kind == 0x11)
        nodes = int.from_bytes(layout._mm[layout._offset(body) + 6 : layout._offset(body) + 8], "little")
    assert nodes > 1
    found, one_by_one = _bulk(path, addresses, monkeypatch)
    assert found == _per_group(path, addresses)
    assert None not in found and one_by_one == 1
    assert [len(vectors) for _, vectors in found] == [12] * 400
    _assert_same(queries.scan(path, workers=1), _plain_scan(path, monkeypatch))


def test_default_format__a_deeper_b_tree_is_left_to_the_per_group_parse(tmp_path, monkeypatch):
    """A group of 300 members outgrows one leaf node of its B-tree (2 × 16 symbol nodes of at most
    8): `h5tables` templates leaf-level trees only, so those groups go one by one, read alike."""
    monkeypatch.setattr(h5bulk, "_FEW", 2)
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as out:
        for i in range(4):
            group = out.create_group(f"accession_W{i}")
            group.create_dataset("sequence", data="ACDE", dtype=h5py.string_dtype())
            group.create_dataset("type_1/layer_0/embedding", data=np.full(4, i, dtype="<f4"))
            for extra in range(300):
                group.create_dataset(f"extra_{extra:03d}", data=[extra])
    addresses = _addresses(path)
    with h5fast.FastLayout.open(path) as layout:
        body = next(body for kind, body, _ in layout._header(addresses[0]) if kind == 0x11)
        assert layout._mm[layout._offset(body) + 5] == 1  # the root is one level above the leaves
    found, one_by_one = _bulk(path, addresses, monkeypatch)
    assert found == _per_group(path, addresses)
    assert None not in found and one_by_one == 4


@pytest.mark.parametrize("form", FORMATS)
def test_irregular_groups__same_results_same_catalogue(tmp_path, monkeypatch, form):
    path = tmp_path / "irregular.h5"
    _irregular_file(path, 640, FORMATS[form])
    addresses = _addresses(path)
    found, one_by_one = _bulk(path, addresses, monkeypatch)
    assert found == _per_group(path, addresses)
    assert one_by_one < len(addresses) / 2  # most were decoded together
    assert 20 < found.count(None) < len(addresses) / 4  # and the odd ones were left to h5py
    _assert_same(queries.scan(path, workers=1), _plain_scan(path, monkeypatch))


@pytest.mark.parametrize("form", FORMATS)
def test_damaged_group_in_the_middle__flipped_bits_read_as_one_by_one(tmp_path, monkeypatch, form):
    """A bit flipped in every other byte of a middle group's objects (in h5py's default format:
    its header, B-tree, local heap and symbol node, and its members'), and in bytes of the global
    heap holding its text: the groups decoded together are those the per-group parse reads, with
    the same results; the rest goes to h5py. Without checksums, a flipped address is followed to
    wherever it points, by both readers alike."""
    path = tmp_path / "good.h5"
    monkeypatch.setattr(h5bulk, "_FEW", 2)  # templates, even for a file this small
    _regular_file(path, 24, libver=FORMATS[form])
    data = path.read_bytes()
    addresses = _addresses(path)
    ordered = sorted(addresses)
    with h5fast.FastLayout.open(path) as layout:  # the global heap holding its sequence's text
        members = layout._links(layout._header(ordered[12]))
        parts = layout._parts(layout._header(members[b"sequence"]))
        collection = layout._offset(layout._storage(parts[LAYOUT][0])[1] + 4)
        heap = range(collection, collection + layout._length(collection + 8))
    rng = np.random.default_rng(5)
    positions = [*range(ordered[12], ordered[13], 2), *rng.choice(heap, 48, replace=False).tolist()]
    broken = tmp_path / "broken.h5"
    declined = 0
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << int(rng.integers(0, 8))
        broken.write_bytes(bytes(damaged))
        found, _ = _bulk(broken, addresses, monkeypatch)
        expected = _per_group(broken, addresses)
        assert found == expected, position
        declined += expected.count(None)
    assert declined > 100  # the flips did make groups unreadable to the direct reader


def test_damaged_group_in_the_middle__same_catalogue_and_errors_as_h5py(tmp_path, monkeypatch):
    path = tmp_path / "good.h5"
    _regular_file(path, 600, dim=16)
    data = path.read_bytes()
    addresses = _addresses(path)
    middle = sorted(addresses)[300]
    routine = checksum_routine()
    with h5fast.FastLayout.open(path) as layout:
        layout.groups(addresses)
        template = layout.templates[0]
        vector = template[-1]
    # the middle group's embedding: its storage address pointed past the file's end, the header's
    # checksum made right again (the library reads the header, then fails on the data)
    with h5fast.FastLayout.open(path) as layout:
        type_at = layout._offset(middle + template[2].field)
        layer_at = layout._offset(type_at + template[3].field)
        dataset = layout._offset(layer_at + vector.field)
    damaged = bytearray(data)
    field = dataset + vector.data[1]
    damaged[field : field + 8] = (len(data) + 64).to_bytes(8, "little")
    end = dataset + vector.size - 4
    damaged[end : end + 4] = routine(bytes(damaged[dataset:end]), end - dataset, 0).to_bytes(4, "little")
    cases = {"past_end": damaged}
    for name, offset in (("header", 9), ("checksum", vector.size - 2)):  # checksum no longer matches
        flipped = bytearray(data)
        flipped[dataset + offset] ^= 0x10
        cases[name] = flipped
    flipped = bytearray(data)
    flipped[middle + 7] ^= 0x01  # the accession group's own header
    cases["group"] = flipped
    for name, content in cases.items():
        broken = tmp_path / f"{name}.h5"
        broken.write_bytes(bytes(content))
        found, _ = _bulk(broken, addresses, monkeypatch)
        assert found == _per_group(broken, addresses), name
        assert found.count(None) == 1, name
        fast = _outcome(queries.scan, broken, workers=1)
        plain = _outcome(_plain_scan, broken, monkeypatch)
        if isinstance(plain, str):
            assert fast == plain, name
        else:
            _assert_same(fast, plain, reads=False)


def test_lookup3__the_library_checksum_at_every_length():
    routine = checksum_routine()
    rng = np.random.default_rng(0)
    for length in [*range(0, 100), 131, 268, 1000, 4099]:
        rows = rng.integers(0, 256, (5, length + 4), dtype=np.uint8)
        got = h5bulk.lookup3(rows, length).tolist()
        assert got == [routine(row[:length].tobytes(), length, 0) for row in rows], length


@pytest.mark.parametrize(
    "texts",
    [
        ["MKV", "A*", "QQ"],
        ["M*K", "**"],
        ["mkv*", "MKV"],
        ["M K", "MKV"],
        ["MKVé"],
        ["", "MKV"],
        ["1", "-"],
        ["ß"],
        [],
    ],
)
def test_clean_many__clean_of_each(texts):
    assert clean_many(list(texts)) == [clean(text) for text in texts]


def _heaps_alike(path, collections: list[int]) -> int:
    """Check the collections walked together against `FastLayout._heap`; how many were walked."""
    collections = sorted(set(collections))
    with h5fast.FastLayout.open(path) as layout:
        walked, keys, data, sizes = h5bulk._heap_objects(layout, np.array(collections, dtype=np.uint64))
        for rank, collection in enumerate(collections):
            try:
                want = layout._heap(collection)
            except (h5bulk.Unsupported, IndexError, ValueError):
                want = None
            if walked[rank]:
                mine = (keys >> np.uint64(32)) == rank
                objects = zip(keys[mine].tolist(), data[mine].tolist(), sizes[mine].tolist(), strict=True)
                assert {key & 0xFFFFFFFF: (at, size) for key, at, size in objects} == want, collection
    return int(walked.sum())


def test_heap_walk__objects_as_one_collection_at_a_time(tmp_path, monkeypatch):
    """Global heap collections walked together, intact and with flipped bits: each one walked
    holds the objects `FastLayout._heap` finds; the others are left to it."""
    path = tmp_path / "regular.h5"
    _regular_file(path, 300)
    data = path.read_bytes()
    collections = [i for i in range(len(data)) if data.startswith(b"GCOL", i)]
    assert _heaps_alike(path, [*collections, 0, 8, len(data) - 4]) == len(collections) >= 3
    monkeypatch.setattr(h5bulk, "_HEAP_STEPS", 3)  # a walk cut short leaves the collection to _heap
    assert _heaps_alike(path, collections) < len(collections)
    monkeypatch.undo()
    rng = np.random.default_rng(11)
    broken = tmp_path / "broken.h5"
    walked = 0
    for _ in range(150):
        damaged = bytearray(data)
        at = int(rng.choice(collections[:3])) + int(rng.integers(0, 4096))
        damaged[at] ^= 1 << int(rng.integers(0, 8))
        broken.write_bytes(bytes(damaged))
        walked += _heaps_alike(broken, collections)
    assert 100 < walked < 150 * len(collections)  # some flips did make a collection odd


@pytest.mark.parametrize(
    "text, expected",
    [("MKV*", "MKV"), ("mk*v**\n", "MK*V"), ("M K V * *", "MKV"), ("*MKV", "*MKV"), ("***", "")],
)
def test_clean__ending_stops_dropped_and_inner_ones_kept(text, expected):
    assert clean(text) == expected
    assert clean_many([text, "MKV"]) == [expected, "MKV"]
