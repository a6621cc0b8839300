"""The template blocks of h5py's default format for `h5bulk`: version-1 object headers and
symbol-table groups (a version-1 B-tree over a local heap of names, the members listed in symbol
nodes): the format h5py writes with its default settings (`bench/lookup.py`'s query files, and
those of any writer that keeps them; the shared real files are in the 1.8 format).

`h5bulk` reads thousands of accession groups at once from one parsed group's template: the
bytes each parse depends on must equal the template's, and the addresses it follows are read as
values. The 1.8 format's headers carry the library's checksum, and there the template compares
what the parse reads. These headers carry none, so a group decoded with a template is one whose
every byte that `FastLayout.group` reads (`h5fast._header_v1`, `h5symbols.symbol_links`) equals
the template group's, save the addresses, which the decode follows as the parse does; the bytes
the parse skips (a header's reference count and padding, the reserved bytes of its messages,
the bodies of messages it never opens, a symbol node's reserved bytes and each entry's cache
scratch pad) may differ. A symbol table is templated when its B-tree is a single leaf node
(level 0: up to 2K symbol nodes, each of up to 2K' members, far more than an accession group
holds); a deeper tree is left to the per-group parse.

Both functions are called on a header or a table that `FastLayout` has just parsed without
error, so what they read is known to be well formed.
"""

from __future__ import annotations

import numpy as np

from .h5bits import CONTINUATION, MAX_CHUNKS, UNREAD, Unsupported

# (file position, mask of the bytes the parse does not read, the block its address is in, where
# in that block): one block of a template, as `h5bulk._chunks` lists them
Chunk = tuple[int, np.ndarray, int, int]


def header_chunks(layout, at: int) -> list[Chunk]:
    """The chunks of the version-1 header at `at`, in the order `FastLayout._header_v1` reads
    them; a continuation chunk's parent is the chunk whose message points to it."""
    mm, o = layout._mm, layout._o
    if mm[at] != 1 or mm[at + 1] != 0:
        raise Unsupported
    size = int.from_bytes(mm[at + 8 : at + 12], "little")
    free = np.zeros(16 + size, dtype=bool)
    free[4:8] = True  # the reference count
    free[12:16] = True  # padding to the messages' 8-byte alignment
    chunks: list[Chunk] = [(at, free, -1, 0)]
    walks = [(at + 16, at + 16 + size)]
    for index, (first, free, _, _) in enumerate(chunks):
        start, end = walks[index]
        while start < end:
            kind = int.from_bytes(mm[start : start + 2], "little")
            size = int.from_bytes(mm[start + 2 : start + 4], "little")
            body = start + 8
            free[start - first + 5 : body - first] = True  # the message header's reserved bytes
            if kind == CONTINUATION:
                chunk, length = layout._offset(body), layout._length(body + o)
                if len(chunks) >= MAX_CHUNKS or not length:
                    raise Unsupported
                free[body - first : body - first + o] = True  # where the chunk is: its own block
                chunks.append((chunk, np.zeros(length, dtype=bool), index, body - first))
                walks.append((chunk, chunk + length))
            elif kind in UNREAD:
                free[body - first : body - first + size] = True
            start = body + size
    return chunks


def table_chunks(layout, body: int) -> tuple[list[Chunk], dict[bytes, tuple[int, int]]]:
    """The blocks of the symbol table whose message body is at `body`, and its members.

    Blocks, in order: the B-tree node, the local heap's header, the heap's data (the names), then
    each symbol node. A parent of -1 is the B-tree's address in the message, -2 the heap's (at
    `body + offset size`); others index this list. Members: name → (block, position in it of
    the member's header address), in the tree's order, as `symbol_links` walks it."""
    mm, o, lengths = layout._mm, layout._o, layout._l
    tree, heap = layout._offset(body), layout._offset(body + o)
    if mm[tree : tree + 6] != b"TREE\x00\x00":  # a leaf-level tree: its children are symbol nodes
        raise Unsupported
    used = int.from_bytes(mm[tree + 6 : tree + 8], "little")
    first = 8 + 2 * o  # the first key; children and keys alternate from there
    tree_free = np.zeros(first + used * (o + lengths) + lengths, dtype=bool)
    nodes = []
    for i in range(used):
        child = first + lengths + i * (o + lengths)
        tree_free[child : child + o] = True
        nodes.append((layout._offset(tree + child), child))
    heap_free = np.zeros(8 + 2 * lengths + o, dtype=bool)
    heap_free[8 + 2 * lengths :] = True  # where the names are: their own block
    size, data = layout._length(heap + 8), layout._offset(heap + 8 + 2 * lengths)
    if not size:
        raise Unsupported
    blocks: list[Chunk] = [
        (tree, tree_free, -1, 0),
        (heap, heap_free, -2, 0),
        (data, np.zeros(size, dtype=bool), 1, 8 + 2 * lengths),
    ]
    members: dict[bytes, tuple[int, int]] = {}
    entry = 2 * o + 24  # name offset, header address, cache type, reserved, scratch pad
    for node, field in nodes:
        count = int.from_bytes(mm[node + 6 : node + 8], "little")
        free = np.zeros(8 + count * entry, dtype=bool)
        free[5] = True  # reserved
        for i in range(count):
            at = 8 + i * entry
            free[at + o : at + 2 * o] = True  # the member's header: its own block
            free[at + 2 * o + 4 : at + entry] = True  # reserved, and the cache's scratch pad
            name_at = data + layout._offset(node + at)
            end = mm.find(b"\x00", name_at, data + size)
            if end < 0:
                raise Unsupported
            members[mm[name_at:end]] = (len(blocks), at + o)
        blocks.append((node, free, 0, field))
    return blocks, members
