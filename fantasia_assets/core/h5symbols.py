"""The members of a symbol-table group (h5py's default format: a version-1 B-tree over a local
heap of names), read for the direct query-file reader (`h5fast.FastLayout`), which hands over the
open layout: its memory map, offset and length sizes, B-tree widths and end of file."""

from __future__ import annotations

from .h5bits import Unsupported


def symbol_links(layout, body: int) -> dict[bytes, int]:
    """Name → header address of the entries of a symbol-table group (version-1 B-tree, local heap).

    The library finds a member by binary search over the B-tree's keys and each node's sorted
    entries, so a tree whose keys or order are damaged hides members that a walk would still
    see: such a tree is refused, and every member listed here is one the library can open.
    """
    mm, o, lengths = layout._mm, layout._o, layout._l
    if layout._tree_k is None:
        raise Unsupported
    leaf_k, inner_k = layout._tree_k
    tree, heap = layout._offset(body), layout._offset(body + o)
    if mm[heap : heap + 5] != b"HEAP\x00":
        raise Unsupported
    size, data = layout._length(heap + 8), layout._offset(heap + 8 + 2 * lengths)
    if data + size > layout._end:
        raise Unsupported
    free = layout._length(heap + 8 + lengths)
    for _ in range(size // (2 * lengths) + 1):  # the free list, checked as the library loads it
        if free == 1:  # the end of the list
            break
        if free >= size:
            raise Unsupported
        following, block = layout._length(data + free), layout._length(data + free + lengths)
        if not following or free + block > size:
            raise Unsupported
        free = following
    else:
        raise Unsupported

    def text(offset: int) -> bytes:
        end = mm.find(b"\x00", data + offset, data + size) if offset < size else -1
        if end < 0:
            raise Unsupported
        return mm[data + offset : end]

    links: dict[bytes, int] = {}
    last = None
    entry = 2 * o + 24
    # (node, expected level or -1 for a symbol node, lowest key (exclusive), highest (inclusive))
    pending: list[tuple[int, int | None, bytes | None, bytes | None]] = [(tree, None, None, None)]
    while pending:
        node, level, low, high = pending.pop()
        if len(links) + len(pending) > 1 << 22:
            raise Unsupported
        if level != -1:
            if mm[node : node + 5] != b"TREE\x00" or level not in (None, mm[node + 5]):
                raise Unsupported
            level, used = mm[node + 5], int.from_bytes(mm[node + 6 : node + 8], "little")
            if not 0 < used <= 2 * inner_k:
                raise Unsupported
            first = node + 8 + 2 * o
            keys = [text(layout._length(first + i * (o + lengths))) for i in range(used + 1)]
            children = []
            for i in range(used):
                if keys[i] > keys[i + 1]:
                    raise Unsupported
                child_low = keys[i] if low is None else max(low, keys[i])
                child_high = keys[i + 1] if high is None else min(high, keys[i + 1])
                child = layout._offset(first + lengths + i * (o + lengths))
                children.append((child, level - 1 if level else -1, child_low, child_high))
            pending.extend(reversed(children))  # popped in key order
            continue
        count = int.from_bytes(mm[node + 6 : node + 8], "little")
        if mm[node : node + 5] != b"SNOD\x01" or count > 2 * leaf_k:
            raise Unsupported
        for i in range(count):
            at = node + 8 + i * entry
            # cache type 0 (nothing cached) or 1 (a group's table); 2 is a soft link
            if int.from_bytes(mm[at + 2 * o : at + 2 * o + 4], "little") not in (0, 1):
                raise Unsupported
            name = text(layout._offset(at))
            if not name or (last is not None and name <= last) or name <= low or name > high:
                raise Unsupported
            links[name] = layout._offset(at + o)
            last = name
    return links
