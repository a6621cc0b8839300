"""Reading thousands of accession groups of one query file at once, from a template.

One writer lays out every group of a query file alike: the same headers, messages, names and
sizes, differing only in where the objects are (the addresses in the links, continuation and
storage messages), in the checksums, and in bytes the reader never looks at (attribute values,
modification times). Parsing each group with `FastLayout.group` costs ~70 µs of Python; here
one group is parsed that way, its headers become a template (the bytes the parse depends on,
and the positions of the addresses it follows), and the other groups are checked against it and
decoded with numpy over the whole file at once: every header chunk's bytes compared to the
template's, its checksum verified (the library's lookup3, computed here for all rows at once),
the storage checked against the end of the file, then the sequence text read as
`FastLayout._text` reads it.

Exactness: a header's parse reads nothing but the header's own bytes (its chunks), and takes the
addresses only as values, so a header equal to the template's outside those places parses as
the template's did, with those values. A group where anything differs or fails is read by
`FastLayout.group` instead (itself leaving to h5py what it does not understand): the result is
the one the per-group parse gives, group by group, and the template is only used once it has
read its own group back the same. Two formats are templated: version-2 headers (the 1.8 format,
with checksums) with compact link storage, and h5py's default one, version-1 headers and
symbol-table groups (`h5tables`, which says what may differ there); other groups go one by one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .h5bits import CONTINUATION, LAYOUT, MAX_CHUNKS, SYMBOL_TABLE, UNREAD, Unsupported, suffix_int
from .h5tables import header_chunks, table_chunks
from .sequences import clean_many

# layouts templated per file, and templates tried that read no other group: past either, the
# rest goes group by group (each template costs a pass over the groups left, ~0.2 µs a group)
_TEMPLATES, _FRUITLESS = 64, 8
_FEW = 128  # fewer groups left than this: read one by one (a template's checks cost ~5 ms)
_HEAP_STEPS = 256  # objects walked per global heap collection together; past that, one by one
# groups decoded together: at most this many, and headers of at most that many bytes (their
# copies, and the checksums' working arrays, take a few times as much)
_BATCH, _BATCH_BYTES = 4096, 1 << 23
_FAILURES = (Unsupported, struct.error, IndexError, KeyError, ValueError, OverflowError)


@dataclass
class _Block:
    """One block of the template group's metadata (an object header's first chunk, or one of its
    continuation chunks), and what to check of it in other groups."""

    role: str  # "group", "string" (the sequence), "vector" (an embedding), or "chunk"
    parent: int  # index of the block holding its address; -1 for the accession group's header
    field: int  # where in that block its address is
    size: int  # bytes, the checksum at the end included
    fixed: np.ndarray  # positions whose bytes must equal the template's
    expected: np.ndarray  # the template's bytes there
    data: tuple[int, int] = (-1, -1)  # string, vector: (block, position) of the storage address
    key: tuple[int, int | None] | None = None  # vector: (type id, layer)
    nbytes: int = 0  # vector: bytes of data
    dim: int = 0
    code: int = 0
    v1: bool = False  # h5py's default format (`h5tables`): no checksum, bounded by the file's end


def read_groups(layout, addresses: list[int | None]) -> list:
    """`layout.group(address)` for each address (None where the address is None)."""
    found: list = [None] * len(addresses)
    pending = np.array([i for i, a in enumerate(addresses) if a is not None], dtype=np.int64)
    # the addresses as unsigned 64-bit numbers: any file offset, and never an overflow
    values = np.array([a if a is not None else 0 for a in addresses], dtype=np.uint64)
    for template in layout.templates:  # those of earlier calls
        if len(pending) >= _FEW:
            pending = _apply(layout, template, values, pending, found)
    while len(pending):
        first, pending = int(pending[0]), pending[1:]
        found[first] = layout.group(addresses[first])
        if (
            not isinstance(found[first], tuple)  # left to h5py, or unusable (`FastLayout.group`)
            or len(pending) < _FEW
            or layout.fruitless >= _FRUITLESS
            or len(layout.templates) >= _TEMPLATES
        ):
            continue
        template = _template(layout, addresses[first], found[first])
        before = len(pending)
        if template is not None:
            layout.templates.append(template)
            pending = _apply(layout, template, values, pending, found)
        layout.fruitless += len(pending) == before  # no other group of that layout (yet)
    return found


def _apply(layout, template: list[_Block], values, pending: np.ndarray, found: list) -> np.ndarray:
    """Decode the pending groups that match the template into `found`; the others, still pending."""
    left = []
    size = max(1, min(_BATCH, _BATCH_BYTES // sum(block.size for block in template)))
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        done, results = _decode(layout, template, values[batch])
        for i, result in zip(batch[done].tolist(), results, strict=True):
            found[i] = result
        left.append(batch[~done])
    return np.concatenate(left) if left else pending


def _decode(layout, template: list[_Block], addresses: np.ndarray) -> tuple[np.ndarray, list]:
    """(which groups matched, their results in order) for groups whose headers are at `addresses`."""
    buf, o = layout.array, layout._o
    ok = np.ones(len(addresses), dtype=bool)
    rows_of: list[np.ndarray] = []
    data: dict[int, np.ndarray] = {}
    for block in template:
        at = addresses if block.parent < 0 else _field(rows_of[block.parent], block.field, o)
        end = layout._end if block.v1 else len(buf)  # (the file's end is at most the map's length)
        if block.size > end:
            return np.zeros(len(addresses), dtype=bool), []
        ok &= at <= np.uint64(end - block.size)
        # each block's bytes as a row: rows of a strided view copied whole, no index per byte
        rows = sliding_window_view(buf, block.size)[np.where(ok, at, 0).astype(np.int64)]
        ok &= (rows[:, block.fixed] == block.expected).all(axis=1)
        if not block.v1:
            _verify_checksums(rows, ok)
        rows_of.append(rows)
        if not ok.any():
            return ok, []
    for j, block in enumerate(template):
        if block.role == "vector":  # as `FastLayout._vector`: data past the file's end is refused
            data[j] = _field(rows_of[block.data[0]], block.data[1], o)
            if layout._end < block.nbytes:
                return np.zeros(len(addresses), dtype=bool), []
            ok &= data[j] <= np.uint64(layout._end - block.nbytes)
        elif block.role == "string":  # as `FastLayout._string`
            data[j] = _field(rows_of[block.data[0]], block.data[1], o)
            ok &= data[j] != np.uint64(layout._undefined)
    strings = next(j for j, block in enumerate(template) if block.role == "string")
    texts = _texts(layout, data[strings], ok)
    rows = np.flatnonzero(ok)
    # each group's [(layer key, (offset, dim, dtype code)), ...], built vector by vector (a
    # Python loop per group and vector costs more than the rest of the decoding)
    vectors = [
        _entries(block.key, data[j][rows].tolist(), block.dim, block.code)
        for j, block in enumerate(template)
        if block.role == "vector"
    ]
    lists = map(list, zip(*vectors, strict=True)) if vectors else ([] for _ in texts)
    results = list(zip(clean_many(texts), lists, strict=True))
    return ok, results


def _entries(key: tuple[int, int | None], offsets: list[int], dim: int, code: int) -> list[tuple]:
    return [(key, (offset, dim, code)) for offset in offsets]


def _texts(layout, where: np.ndarray, ok: np.ndarray) -> list[str]:
    """The sequences of the groups still `ok`, read as `FastLayout._text` reads them from the
    string elements at `where` (gathered at once); `ok` cleared where that read would fail."""
    buf, o, mm = layout.array, layout._o, layout._mm
    element = 8 + o  # length, global heap collection, object index
    if len(buf) < element:
        ok[:] = False
        return []
    ok &= where <= np.uint64(len(buf) - element)  # an element cut short: read group by group
    rows = sliding_window_view(buf, element)[np.where(ok, where, 0).astype(np.int64)]
    lengths, indices, collections = _field(rows, 0, 4), _field(rows, 4 + o, 4), _field(rows, 4, o)
    unique = np.unique(collections[ok])
    walked, keys, starts, sizes = _heap_objects(layout, unique)
    # the objects of the collections walked here, found by (collection, index) all at once
    rank = np.minimum(np.searchsorted(unique, collections), max(len(unique) - 1, 0))
    mine = ok & walked[rank] if len(unique) else np.zeros(len(ok), dtype=bool)
    wanted = (rank.astype(np.uint64) << np.uint64(32)) | indices
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    hit = mine & (keys[at] == wanted) if len(keys) else np.zeros(len(ok), dtype=bool)
    start = np.where(hit, starts[at] if len(keys) else 0, 0)
    stored = np.where(hit, sizes[at] if len(keys) else 0, 0)
    # as `_text`: an index the collection lacks, an empty or mis-sized text, one past the end
    ok &= ~mine | (hit & (lengths != 0) & (stored == lengths) & (start + lengths <= np.uint64(len(buf))))
    heaps = {}  # the other collections, read by `FastLayout._heap` (an odd one, or a long walk)
    for collection in unique[~walked].tolist():
        try:
            heaps[collection] = layout._heap(collection)
        except _FAILURES:
            heaps[collection] = {}
    lengths, indices, collections = lengths.tolist(), indices.tolist(), collections.tolist()
    mine, start = mine.tolist(), start.tolist()
    texts = []
    for i in np.flatnonzero(ok).tolist():
        length = lengths[i]
        if mine[i]:
            text = mm[start[i] : start[i] + length]
        else:
            entry = heaps[collections[i]].get(indices[i])
            text = mm[entry[0] : entry[0] + length] if entry is not None else b""
            if not length or entry is None or entry[1] != length or len(text) != length:
                ok[i] = False
                continue
        if b"\x00" in text:
            ok[i] = False
            continue
        try:
            texts.append(text.decode("utf-8"))
        except UnicodeDecodeError:
            ok[i] = False
    return texts


def _heap_objects(layout, collections: np.ndarray) -> tuple[np.ndarray, ...]:
    """The global heap collections at `collections` (sorted, distinct) walked together, each as
    `FastLayout._heap` walks it: (which ones were walked here, the others being left to it; then
    of their objects, by key: key (position in `collections` << 32 | object index), data, size)."""
    buf, lengths = layout.array, layout._l
    head = (8 + lengths + 7) // 8 * 8  # a collection's header, and each object's: 8-byte aligned
    count = len(collections)
    if layout._end < head or not count:  # (the end of the file is at most the map's length)
        return np.zeros(count, dtype=bool), *(np.zeros(0, dtype=np.uint64),) * 3
    walked = collections <= np.uint64(layout._end - head)
    rows = sliding_window_view(buf, 8 + lengths)[np.where(walked, collections, 0).astype(np.int64)]
    walked &= (rows[:, :5] == np.frombuffer(b"GCOL\x01", dtype=np.uint8)).all(axis=1)
    size = _field(rows, 8, lengths)
    walked &= size <= np.where(walked, np.uint64(layout._end) - np.where(walked, collections, 0), 0)
    end = collections + np.where(walked, size, 0)
    position = collections + np.uint64(head)
    active = walked & (position + np.uint64(head) <= end)
    found: list[tuple[np.ndarray, ...]] = []
    for _ in range(_HEAP_STEPS):
        if not active.any():
            break
        ids = np.flatnonzero(active)
        at = position[ids]
        rows = sliding_window_view(buf, 8 + lengths)[at.astype(np.int64)]
        index, size, room = _field(rows, 0, 2), _field(rows, 8, lengths), end[ids] - at
        bad = size > room  # as `_heap`: an object running past its collection's end
        size = np.where(bad, 0, size)
        step = np.where(index == 0, size, head + (size + 7) // 8 * 8)  # free space: its own size
        bad |= (step < head) | (step > room)
        walked[ids[bad]] = False
        keep = ~bad & (index != 0)
        found.append(
            ((ids[keep].astype(np.uint64) << np.uint64(32)) | index[keep], at[keep] + head, size[keep])
        )
        position[ids] = at + step
        active[ids[bad]] = False
        active &= position + np.uint64(head) <= end
    else:
        walked &= ~active  # a walk longer than that: left to `FastLayout._heap`
    keys, data, sizes = (
        (np.concatenate(part) for part in zip(*found, strict=True))
        if found
        else (np.zeros(0, dtype=np.uint64),) * 3
    )
    order = np.argsort(keys, kind="stable")
    keys, data, sizes = keys[order], data[order], sizes[order]
    walked[(keys[1:][keys[1:] == keys[:-1]] >> np.uint64(32)).astype(np.int64)] = False  # an index twice
    keep = walked[(keys >> np.uint64(32)).astype(np.int64)]
    return walked, keys[keep], data[keep], sizes[keep]


def _field(rows: np.ndarray, at: int, width: int) -> np.ndarray:
    """The little-endian unsigned numbers of `width` bytes at column `at` of each row, as uint64."""
    return np.ascontiguousarray(rows[:, at : at + width]).view(f"<u{width}").ravel().astype(np.uint64)


def _verify_checksums(rows: np.ndarray, ok: np.ndarray) -> None:
    """Clear `ok` where a row's stored checksum (its last 4 bytes) does not match its other bytes."""
    size = rows.shape[1]
    stored = np.ascontiguousarray(rows[:, size - 4 :]).view("<u4").ravel()
    ok &= lookup3(rows, size - 4) == stored


def _rotate(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint32(k)) | (x >> np.uint32(32 - k))


def lookup3(rows: np.ndarray, length: int) -> np.ndarray:
    """The HDF5 metadata checksum (Bob Jenkins' lookup3 `hashlittle`, initial value 0) of the
    first `length` bytes of each row, computed for all rows at once: one call of the library's
    routine per header would cost as much as the rest of the decoding."""
    blocks = max((length + 11) // 12, 1)
    padded = np.zeros((len(rows), blocks * 12), dtype=np.uint8)  # the tail's missing bytes add 0
    padded[:, :length] = rows[:, :length]
    words = padded.view("<u4").astype(np.uint32).reshape(len(rows), blocks, 3)
    start = np.uint32((0xDEADBEEF + length) & 0xFFFFFFFF)
    a, b, c = (np.full(len(rows), start, dtype=np.uint32) for _ in range(3))
    if length == 0:
        return c
    for block in range(blocks):
        a += words[:, block, 0]
        b += words[:, block, 1]
        c += words[:, block, 2]
        if block == blocks - 1:  # the last 1 to 12 bytes: the final mix instead
            break
        a -= c
        a ^= _rotate(c, 4)
        c += b
        b -= a
        b ^= _rotate(a, 6)
        a += c
        c -= b
        c ^= _rotate(b, 8)
        b += a
        a -= c
        a ^= _rotate(c, 16)
        c += b
        b -= a
        b ^= _rotate(a, 19)
        a += c
        c -= b
        c ^= _rotate(b, 4)
        b += a
    c ^= b
    c -= _rotate(b, 14)
    a ^= c
    a -= _rotate(c, 11)
    b ^= a
    b -= _rotate(a, 25)
    c ^= b
    c -= _rotate(b, 16)
    a ^= c
    a -= _rotate(c, 4)
    b ^= a
    b -= _rotate(a, 14)
    c ^= b
    c -= _rotate(b, 24)
    return c


def _template(layout, address: int, parsed) -> list[_Block] | None:
    """The template of the group at `address`, which `layout.group` parsed into `parsed`, its
    headers in the order `FastLayout._group` reads them; None when its layout is not one to
    template, or when the template does not read the group back as `parsed`."""
    o = layout._o
    template: list[_Block] = []
    starts: list[int] = []  # where each block of the template group is in the file

    def add(role: str, at: int, parent: int, field: int, key=None) -> dict[bytes, int]:
        """Append the blocks of the header at `at`; for a group, its links: name → where the
        target's address is, as (block, position)."""
        messages = layout._header(at)
        v1 = layout._mm[at] == 1
        chunks = header_chunks(layout, at) if v1 else _chunks(layout, at)
        first = len(template)

        def place(position: int) -> tuple[int, int]:
            """(block, position in it) of a file position, marked as not compared."""
            for index, (start, free, _, _) in enumerate(chunks):
                if start <= position and position + o <= start + len(free):
                    free[position - start : position - start + o] = True
                    return first + index, position - start
            raise Unsupported

        links: dict[bytes, tuple[int, int]] = {}
        extra: dict = {}
        tables: list = []  # a symbol table's blocks (`h5tables`), after the header's
        if role == "group":
            fields, table = layout._link_fields(messages)
            if table is not None:  # a symbol table: its tree, heap and nodes are blocks of their own
                body = next(body for kind, body, _ in messages if kind == SYMBOL_TABLE)
                tables, members = table_chunks(layout, body)
                roots = {-1: place(body), -2: place(body + o)}  # the tree's address, the heap's
            links = {name: place(position) for name, position in sorted(fields.items())}
        else:
            body = layout._parts(messages)[LAYOUT][0]
            if layout._mm[body + 1] != 1:  # contiguous storage only (compact data is in the header)
                raise Unsupported
            extra["data"] = place(body + 2)
            if role == "vector":
                _, dim, code = layout._vector(messages)
                extra.update(key=key, nbytes=layout._length(body + 2 + o), dim=dim, code=code)
        for index, (start, free, up, position) in enumerate(chunks):
            fixed = np.flatnonzero(~free)
            expected = np.frombuffer(layout._mm[start : start + len(free)], dtype=np.uint8)[fixed]
            if index == 0:
                block = _Block(role, parent, field, len(free), fixed, expected, **extra, v1=v1)
            else:
                block = _Block("chunk", first + up, position, len(free), fixed, expected, v1=v1)
            template.append(block)
            starts.append(start)
        base = len(template)
        for start, free, up, position in tables:
            fixed = np.flatnonzero(~free)
            expected = np.frombuffer(layout._mm[start : start + len(free)], dtype=np.uint8)[fixed]
            up, position = roots[up] if up < 0 else (base + up, position)
            template.append(_Block("table", up, position, len(free), fixed, expected, v1=True))
            starts.append(start)
        if tables:
            links = {name: (base + block, position) for name, (block, position) in sorted(members.items())}
        return links

    def target(link: tuple[int, int]) -> int:
        """The address a link of the template group holds."""
        block, position = link
        return layout._offset(starts[block] + position)

    try:
        members = add("group", address, -1, 0)
        if b"sequence" not in members:
            return None
        add("string", target(members[b"sequence"]), *members[b"sequence"])
        for member, link in members.items():
            type_id = suffix_int(member, "type_")
            if type_id is None:
                continue
            for child, child_link in add("group", target(link), *link).items():
                if child == b"embedding":
                    add("vector", target(child_link), *child_link, (type_id, None))
                    continue
                layer = suffix_int(child, "layer_")
                if layer is None:
                    continue
                inner = add("group", target(child_link), *child_link)
                if b"embedding" not in inner:
                    return None
                add("vector", target(inner[b"embedding"]), *inner[b"embedding"], (type_id, layer))
        done, results = _decode(layout, template, np.array([address], dtype=np.uint64))
    except _FAILURES:
        return None
    return template if done[0] and results == [parsed] else None


def _chunks(layout, at: int) -> list[tuple[int, np.ndarray, int, int]]:
    """The chunks of the version-2 header at `at`, in the order `FastLayout._header` reads them:
    (file position, mask of the bytes that parse does not read, index of the chunk whose
    continuation message points to it, where in that chunk its address is)."""
    mm, o = layout._mm, layout._o
    if mm[at : at + 5] != b"OHDR\x02" or layout._checksum is None:  # checked by the library's routine
        raise Unsupported
    flags = mm[at + 5]
    pos = at + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    start = pos + (1 << (flags & 3))
    end = start + int.from_bytes(mm[pos:start], "little")
    free = np.zeros(end + 4 - at, dtype=bool)
    free[6 : pos - at] = True  # access times and attribute phase change values: skipped
    order = 2 if flags & 0x04 else 0
    chunks = [(at, free, -1, 0)]
    walks = [(start, end)]  # where each chunk's messages are
    for index, (first, free, _, _) in enumerate(chunks):
        free[len(free) - 4 :] = True  # the checksum: verified on its own
        start, end = walks[index]
        while start + 4 + order <= end:
            kind, size = mm[start], int.from_bytes(mm[start + 1 : start + 3], "little")
            body = start + 4 + order
            if kind == CONTINUATION:
                chunk, length = layout._offset(body), layout._length(body + o)
                if mm[chunk : chunk + 4] != b"OCHK" or length < 8 or len(chunks) >= MAX_CHUNKS:
                    raise Unsupported
                free[body - first : body - first + o] = True  # where the chunk is: its own block
                chunks.append((chunk, np.zeros(length, dtype=bool), index, body - first))
                walks.append((chunk + 4, chunk + length - 4))
            elif kind in UNREAD:  # their bytes may differ (the checksum covers them)
                free[body - first : body - first + size] = True
            start = body + size
    return chunks
