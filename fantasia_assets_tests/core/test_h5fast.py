"""The direct HDF5 reader of the query scan (core/h5fast.py) gives exactly the plain h5py scan's
catalogue, on real files, in both HDF5 formats, and on odd, unusual and damaged groups."""

from __future__ import annotations

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from fantasia_assets.core import h5bits, h5fast, h5heaps, queries  # noqa: E402
from fantasia_assets_tests.conftest import shared_file  # noqa: E402

FORMATS = {"earliest": ("earliest", "latest"), "v108": ("v108", "v108")}


@pytest.fixture
def counted(monkeypatch):
    """Counts of groups the fast reader read and declined, during the scans of one test."""
    counts = {"fast": 0, "declined": 0}
    original = h5fast.FastLayout.groups

    def groups(self, addresses):
        found = original(self, addresses)
        for address, parsed in zip(addresses, found, strict=True):
            if address is not None:
                counts["declined" if parsed is None else "fast"] += 1
        return found

    monkeypatch.setattr(h5fast.FastLayout, "groups", groups)
    return counts


def _plain_scan(path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(queries.FastLayout, "open", classmethod(lambda cls, path: None))
        return queries.scan(path, workers=1)


def _outcome(call, *args, **kwargs):
    """The call's result, or its EmbeddingFileError as text."""
    try:
        return call(*args, **kwargs)
    except queries.EmbeddingFileError as error:
        return f"error: {error}"


def _assert_same(fast, plain, reads: bool = True) -> None:
    assert fast.accessions == plain.accessions
    assert fast.sequences == plain.sequences
    assert fast.skipped == plain.skipped
    assert fast.attrs == plain.attrs
    assert list(fast.layers) == list(plain.layers)
    for key, entries in plain.layers.items():
        for field in ("rows", "offsets", "dims", "dtype_codes"):
            got, want = getattr(fast.layers[key], field), getattr(entries, field)
            assert got.dtype == want.dtype and np.array_equal(got, want), (key, field)
        if not reads:
            continue
        for metric in ("cosine", None):
            got = _outcome(fast.read_valid, key, metric=metric)
            want = _outcome(plain.read_valid, key, metric=metric)
            if isinstance(want, str):
                assert got == want
            else:
                assert all(np.array_equal(a, b) for a, b in zip(got[:2], want[:2], strict=True))
                assert got[2] == want[2]
        assert str(_outcome(fast.read, key)) == str(_outcome(plain.read, key))


@pytest.mark.parametrize("name", ["queries_mouse.h5", "queries_mouse_two_models.h5"])
def test_real_query_files__every_group_read_fast_and_identical(name, monkeypatch, counted):
    path = shared_file(name)
    fast = queries.scan(path, workers=1)
    assert counted == {"fast": len(fast.accessions), "declined": 0}
    _assert_same(fast, _plain_scan(path, monkeypatch))


def _odd_file(path, libver) -> None:
    """Plain groups in both dtypes, then every unusual shape of group the scan must report alike."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w", libver=libver) as out:
        out.attrs["embedding_type_id"] = 1
        for i in range(12):
            group = out.create_group(f"accession_P{i:02d}")
            group.create_dataset("sequence", data="MKVL-1 " * (i + 1), dtype=h5py.string_dtype())
            group.attrs["note"] = "kept"
            for layer in (0, 3):
                data = rng.standard_normal(16).astype("<f4" if i % 3 else "<f8")
                group.create_dataset(f"type_1/layer_{layer}/embedding", data=data)
            group.create_dataset("type_2/embedding", data=rng.standard_normal(8).astype("<f4"))
            group.create_dataset("type_x/layer_0/embedding", data=np.ones(4, "<f4"))
            group.create_dataset("type_1/other", data=np.ones(2))
        vector = rng.standard_normal(16).astype("<f4")
        odd = {
            "gzip": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector, compression="gzip"),
            "chunked": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector, chunks=(4,)),
            "big_endian": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector.astype(">f4")),
            "half": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector.astype("<f2")),
            "ints": lambda g: g.create_dataset("type_1/layer_0/embedding", data=np.arange(16)),
            "row": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector[None, :]),
            "matrix": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector.reshape(4, 4)),
            "scalar": lambda g: g.create_dataset("type_1/layer_0/embedding", data=np.float32(1)),
            "empty": lambda g: g.create_dataset("type_1/layer_0/embedding", data=np.zeros(0, "<f4")),
            "short": lambda g: g.create_dataset("type_1/layer_0/embedding", data=vector[:7]),
            "nan": lambda g: g.create_dataset("type_1/layer_0/embedding", data=np.full(16, np.nan, "<f4")),
            "unwritten": lambda g: g.create_dataset("type_1/layer_0/embedding", shape=(16,), dtype="<f4"),
            "compact": lambda g: g.create_dataset(
                "type_1/layer_0/embedding",
                data=vector,
                dcpl=_compact_plist(),
            ),
            "no_embedding": lambda g: g.create_group("type_1/layer_0"),
            "layer_dataset": lambda g: g.create_dataset("type_1/layer_0", data=vector),
            "type_dataset": lambda g: g.create_dataset("type_1", data=vector),
            "embedding_group": lambda g: g.create_group("type_1/layer_0/embedding"),
            "soft_link": lambda g: g.__setitem__("type_1", h5py.SoftLink("/accession_P01/type_1")),
            "external_link": lambda g: g.__setitem__("type_1", h5py.ExternalLink("elsewhere.h5", "/x")),
            "hard_link": lambda g: g.__setitem__("type_1", out["accession_P01/type_1"]),
            "many_members": lambda g: [g.create_dataset(f"extra_{j}", data=[j]) for j in range(12)],
            "many_layers": lambda g: [
                g.create_dataset(f"type_1/layer_{j}/embedding", data=vector) for j in range(12)
            ],
            "duplicate_type": lambda g: [
                g.create_dataset(f"type_{name}/layer_0/embedding", data=vector) for name in ("1", "01", "+1")
            ],
        }
        sequences = {
            "no_sequence": None,
            "sequence_group": "group",
            "sequence_bytes": np.bytes_(b"MKV"),
            "sequence_ascii_vlen": ("MKV", h5py.string_dtype("ascii")),
            "sequence_fixed": ("MKV", h5py.string_dtype("utf-8", 8)),
            "sequence_number": 7,
            "sequence_array": (["MKV", "LLA"], h5py.string_dtype()),
            "sequence_empty": ("", h5py.string_dtype()),
            "sequence_latin1": (b"MK\xe9V", h5py.string_dtype("ascii")),
            "sequence_unicode": ("MKVé", h5py.string_dtype()),
        }
        for name, make in odd.items():
            group = out.create_group(f"accession_{name}")
            group.create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
            make(group)
        for name, sequence in sequences.items():
            group = out.create_group(f"accession_{name}")
            if sequence == "group":
                group.create_group("sequence")
            elif isinstance(sequence, tuple):
                group.create_dataset("sequence", data=sequence[0], dtype=sequence[1])
            elif sequence is not None:
                group.create_dataset("sequence", data=sequence)
            group.create_dataset("type_1/layer_0/embedding", data=vector)
        for name in ("P|1 x", "é→ü", ".", "a.b", " ", "0"):  # names the lookup must take as they are
            group = out.create_group(f"accession_{name}")
            group.create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
            group.create_dataset("type_1/layer_0/embedding", data=vector)
        out.create_group("other_group").create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
        out.create_dataset("accession_dataset", data=vector)
        out["accession_soft"] = h5py.SoftLink("/accession_P00")


def _compact_plist():
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_layout(h5py.h5d.COMPACT)
    return plist


@pytest.mark.parametrize("libver", list(FORMATS))
def test_odd_groups__same_catalogue_same_reasons_same_errors(tmp_path, libver, monkeypatch, counted):
    path = tmp_path / "odd.h5"
    _odd_file(path, FORMATS[libver])
    fast = queries.scan(path, workers=1)
    assert counted["fast"] >= 18 and counted["declined"] >= 20  # both paths were taken
    plain = _plain_scan(path, monkeypatch)
    assert len(plain.skipped) >= 10  # the odd groups do exercise the scan's reasons
    _assert_same(fast, plain)


@pytest.mark.parametrize("libver", list(FORMATS))
def test_damaged_metadata__declined_and_reported_as_h5py_does(tmp_path, libver, monkeypatch):
    """A flipped bit anywhere outside the vectors' data (headers, link tables, B-trees, heaps):
    the same catalogue, skips and errors as h5py's. Version-2 headers carry checksums; version-1
    ones and symbol tables do not, so there the reader must refuse what the library refuses."""
    path = tmp_path / "good.h5"
    _odd_file(path, FORMATS[libver])
    data = bytearray(path.read_bytes())
    outside = np.ones(len(data), dtype=bool)
    for entries in _plain_scan(path, monkeypatch).layers.values():
        for offset, dim, code in zip(entries.offsets, entries.dims, entries.dtype_codes, strict=True):
            if offset >= 0:
                outside[offset : offset + dim * (4 if code == 0 else 8)] = False
    metadata = np.flatnonzero(outside)
    rng = np.random.default_rng(1)
    for trial in range(16):
        damaged = bytearray(data)
        damaged[int(rng.choice(metadata))] ^= 1 << int(rng.integers(0, 8))
        broken = tmp_path / f"damaged{trial}.h5"
        broken.write_bytes(bytes(damaged))
        fast = _outcome(queries.scan, broken, workers=1)
        plain = _outcome(_plain_scan, broken, monkeypatch)
        if isinstance(plain, str):
            assert fast == plain
        else:
            _assert_same(fast, plain, reads=False)


def test_mostly_declined_file__rest_read_by_h5py_alone(tmp_path, monkeypatch, counted):
    """Compressed vectors everywhere: after the first groups the scan stops trying the fast reader."""
    path = tmp_path / "gzip.h5"
    with h5py.File(path, "w", libver="v108") as out:
        for i in range(queries._FAST_PROBE + 40):
            group = out.create_group(f"accession_P{i:04d}")
            group.create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
            group.create_dataset("type_1/layer_0/embedding", data=np.full(8, i, "<f4"), compression="gzip")
    fast = queries.scan(path, workers=1)
    assert counted == {"fast": 0, "declined": queries._FAST_PROBE}
    _assert_same(fast, _plain_scan(path, monkeypatch), reads=False)
    assert len(fast.accessions) == queries._FAST_PROBE + 40


def test_unsupported_files_are_not_opened(tmp_path):
    assert h5fast.FastLayout.open(tmp_path / "missing.h5") is None
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    assert h5fast.FastLayout.open(empty) is None
    text = tmp_path / "text.h5"
    text.write_bytes(b"not an HDF5 file at all" * 10)
    assert h5fast.FastLayout.open(text) is None
    offset = tmp_path / "userblock.h5"
    with h5py.File(offset, "w", userblock_size=512) as out:
        out.create_group("accession_P").create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
    assert h5fast.FastLayout.open(offset) is None
    assert [*queries.scan(offset, workers=1).accessions] == ["P"]


def test_damaged_compressed_vector__clear_error_naming_group(tmp_path):
    path = tmp_path / "gzip.h5"
    with h5py.File(path, "w") as out:
        group = out.create_group("accession_P1")
        group.create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
        vector = group.create_dataset(
            "type_1/layer_0/embedding", data=np.arange(64, dtype="<f4"), compression="gzip"
        )
        chunk = vector.id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = bytes(chunk.size)  # not gzip any more
    path.write_bytes(bytes(data))
    catalogue = queries.scan(path, workers=1)
    with pytest.raises(queries.EmbeddingFileError, match=r"gzip\.h5: group accession_P1: type_1/layer_0"):
        catalogue.read((1, 0))


def test_an_error_inside_the_reader_is_not_hidden_by_closing_its_map(tmp_path):
    """An error raised while a view of the map is alive (its frame, kept by the traceback, holds
    one) reaches the caller as itself, not as the map's BufferError on close; the map is freed
    once the last view goes."""
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as out:
        out.create_group("accession_P").create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
    layout = h5fast.FastLayout.open(path)
    assert layout is not None

    def read_then_fail():
        header = np.frombuffer(layout._mm, dtype=np.uint8, count=8)  # noqa: F841  (a live view)
        raise queries.EmbeddingFileError("damaged group")

    with pytest.raises(queries.EmbeddingFileError, match="damaged group"), layout:
        read_then_fail()
    again = h5fast.FastLayout.open(path)
    view = np.frombuffer(again._mm, dtype=np.uint8, count=8)
    again.close()  # with a view alive: no error, and the view still reads the file
    assert bytes(view) == b"\x89HDF\r\n\x1a\n"


def _endless_heap_file(path, libver) -> tuple[int, int]:
    """A query file whose sequences share one global heap collection, then damaged so that the
    HDF5 library would walk that collection without end: its free-space object (index 0) is given
    size 0. Returns (the collection's byte, the free-space object's byte)."""
    with h5py.File(path, "w", libver=FORMATS[libver]) as out:
        for i in range(4):
            group = out.create_group(f"accession_P{i}")
            group.create_dataset("sequence", data="MKV" * (i + 1), dtype=h5py.string_dtype())
            group.create_dataset("type_1/layer_0/embedding", data=np.full(8, i, "<f4"))
        # an ASCII string: the direct reader declines it, and h5py would read it
        ascii_text = h5py.string_dtype("ascii")
        out.create_group("accession_ascii").create_dataset("sequence", data=b"MKV", dtype=ascii_text)
        # the same, stored compact (in its header): the guard finds its elements from the header
        group = out.create_group("accession_ascii_compact")
        space = h5py.h5s.create(h5py.h5s.SCALAR)
        compact = h5py.h5d.create(
            group.id, b"sequence", h5py.h5t.py_create(ascii_text, logical=True), space, _compact_plist()
        )
        compact.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(b"MKVL", dtype=ascii_text))
        assert compact.get_offset() is None
    data = bytearray(path.read_bytes())
    collection = data.index(b"GCOL\x01")
    assert data.find(b"GCOL\x01", collection + 1) < 0  # one collection holds every sequence
    end = collection + int.from_bytes(data[collection + 8 : collection + 16], "little")
    at = collection + 16
    while int.from_bytes(data[at : at + 2], "little") != 0:  # to the free space after the objects
        at += 16 + (int.from_bytes(data[at + 8 : at + 16], "little") + 7) // 8 * 8
        assert at + 16 <= end
    data[at + 8 : at + 16] = bytes(8)
    path.write_bytes(bytes(data))
    return collection, at


def _in_child(call, *args):
    """`call(*args)` in a forked child, given up on after 60 s: a scan the HDF5 library loops
    in cannot be interrupted in this process, and a regression must fail, not hang the suite."""
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        return pool.apply_async(call, args).get(60)
    except multiprocessing.TimeoutError:
        pytest.fail(f"{call.__name__} did not end within 60 s")
    finally:
        pool.terminate()


def _scan_skips(path) -> tuple[list[str], list[tuple[str, str]]]:
    catalogue = queries.scan(path, workers=1)
    return catalogue.accessions, catalogue.skipped


def _plain_groups_skips(path) -> list[tuple[str, str]]:
    """The groups read without a direct reader of their own (a worker's `_scan_groups`)."""
    with h5py.File(path, "r") as handle:
        names = list(handle)
    return queries._scan_groups(str(path), names)["skipped"]


@pytest.mark.parametrize("libver", list(FORMATS))
def test_endless_heap__groups_skipped_with_where_instead_of_a_scan_that_never_ends(tmp_path, libver):
    """A global heap collection that the library would read again and again (a free-space object
    of size 0): every group whose sequence lives there is skipped, with a reason that says where,
    also the one the direct reader declines (h5py would read it) and in a worker without the
    direct reader's catalogue; h5py itself, asked, never returns (measured in bench/scan.py)."""
    path = tmp_path / "endless.h5"
    collection, at = _endless_heap_file(path, libver)
    reason = (
        f"unreadable 'sequence' dataset (the global heap collection at byte {collection} is damaged: "
        f"its object at byte {at} is free space of size 0, which the HDF5 library reads again "
        "without end)"
    )
    names = [
        "accession_P0",
        "accession_P1",
        "accession_P2",
        "accession_P3",
        "accession_ascii",
        "accession_ascii_compact",
    ]
    accessions, skipped = _in_child(_scan_skips, path)
    assert accessions == []
    assert skipped == [(name, reason) for name in names]
    assert _in_child(_plain_groups_skips, path) == [(name, reason) for name in names]


def test_endless_walk_is_the_librarys_walk(tmp_path):
    """`h5heaps.endless_walk` follows the library's steps: a misaligned free-space step is walked on, a step
    past the collection ends the walk (the library's own error, h5py's to report), and a step of
    0 is endless wherever the walk reaches it."""
    path = tmp_path / "one.h5"
    collection, free = _endless_heap_file(path, "earliest")
    data = bytearray(path.read_bytes())
    data[free + 8 : free + 16] = (4096).to_bytes(8, "little")  # undamaged again: past the end
    first = collection + 16

    def walk(change) -> str:
        damaged = bytearray(data)
        change(damaged)
        path.write_bytes(bytes(damaged))
        with h5fast.FastLayout.open(path) as layout:
            try:
                h5heaps.endless_walk(layout, collection)
            except h5bits.Endless as endless:
                return str(endless)
        return "ends"

    def free_space_first(size, then=None):
        """The first object made free space of `size` bytes, then `then` at the next step."""

        def change(d):
            d[first : first + 2] = bytes(2)
            d[first + 8 : first + 16] = size.to_bytes(8, "little")
            if then is not None:
                d[first + size : first + size + 16] = then

        return change

    assert walk(lambda d: None) == "ends"
    assert walk(free_space_first(10**6)) == "ends"  # a step past the collection: the library's error
    assert walk(free_space_first(24, bytes(16))) == (
        f"the global heap collection at byte {collection} is damaged: its object at byte "
        f"{first + 24} is free space of size 0, which the HDF5 library reads again without end"
    )
    assert f"object at byte {first + 13} " in walk(free_space_first(13, bytes(16)))  # misaligned


def _scan_error(path) -> str:
    try:
        queries.scan(path, workers=1)
    except queries.EmbeddingFileError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("libver", list(FORMATS))
def test_endless_heap_of_the_files_attributes__a_clear_error_instead_of_a_scan_that_never_ends(
    tmp_path, libver
):
    """The file's own attributes (read into the catalogue) are read by h5py too: a string one in a
    collection the library would walk without end refuses the file, saying where; an integer
    attribute is not taken for heap pointers, and the undamaged file scans with its attributes."""
    path = tmp_path / "attributes.h5"
    with h5py.File(path, "w", libver=FORMATS[libver]) as out:
        out.attrs["layers"] = np.arange(6, dtype="<i8")
        out.attrs["names"] = np.array(["NEAR", "ProtT5"], dtype=h5py.string_dtype())
        out.attrs["model"] = "NEAR"
        group = out.create_group("accession_P1")
        group.create_dataset("sequence", data=np.array(b"MKV"), dtype=h5py.string_dtype("ascii", 3))
    good = queries.scan(path, workers=1)
    assert good.accessions == ["P1"] and good.attrs["model"] == "NEAR"
    assert good.attrs["layers"] == list(range(6)) and good.attrs["names"] == ["NEAR", "ProtT5"]
    data = bytearray(path.read_bytes())
    collection = data.index(b"GCOL\x01")
    first = collection + 16
    data[first : first + 2] = bytes(2)  # its first object made free space of size 0
    data[first + 8 : first + 16] = bytes(8)
    path.write_bytes(bytes(data))
    assert _in_child(_scan_error, path) == (
        f"{path}: not a readable HDF5 file (its attributes: the global heap collection at byte "
        f"{collection} is damaged: its object at byte {first} is free space of size 0, which the "
        "HDF5 library reads again without end)"
    )
