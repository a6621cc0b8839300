"""Global heap collections that the HDF5 library would read without end, found before it reads them.

The library loads a collection whole, stepping from object header to object header by each
object's size. A free-space object (index 0) of size 0 is a step of 0: the library reads the same
header again, forever (HDF5 2.0, measured: `bench/scan.py --damage`), inside h5py's read, where no
timeout in the process can stop it. The direct reader (`h5fast`) checks the collections a group's
sequence points into, both for the groups it decodes and before h5py reads one it declines
(`h5plain.scan_group`), and such a group is skipped with `Endless`'s text: where the collection is
and which object loops. Any other damage stays the library's to report, as h5py reports it.

The functions take an open `h5fast.FastLayout` (its memory map and the file's sizes).
"""

from __future__ import annotations

import struct

from .h5bits import DATATYPE, LAYOUT, VLEN_CLASS, Endless, Unsupported


def unreadable(damage: Endless) -> str:
    """A group's skip reason for a sequence the library would read without end."""
    return f"unreadable 'sequence' dataset ({damage})"


def endless(layout, address: int | None) -> str | None:
    """Why a group is unusable whose sequence, the dataset with its header at `address`, the
    library would never finish reading (`Endless`), or None. Any variable-length dataset (an ASCII
    string, an array of strings) is checked, not only one the direct reader decodes."""
    try:
        if address is not None:
            first = {kind: body for kind, body, _ in reversed(layout._header(address))}
            if layout._mm[first[DATATYPE]] & 0x0F == VLEN_CLASS:  # its elements point into heaps
                _, where, size = layout._storage(first[LAYOUT])
                return endless_elements(layout, where, size)
    except (Unsupported, struct.error, IndexError, KeyError, ValueError, OverflowError):
        pass
    return None


def endless_elements(layout, where: int, size: int) -> str | None:
    """`endless` of a variable-length dataset whose stored elements are the `size` bytes at
    `where`: each a length, a collection's address and an object's index."""
    mm = layout._mm
    element = 8 + layout._o
    starts = range(where, min(where + size, layout._end) - element + 1, element)
    # the library reads no heap for an empty element (length 0)
    heaps = {layout._offset(at + 4) for at in starts if mm[at : at + 4] != bytes(4)}
    try:
        for collection in sorted(heaps):
            endless_walk(layout, collection)
    except Endless as damage:
        return unreadable(damage)
    except (struct.error, IndexError, ValueError, OverflowError):
        pass
    return None


def endless_walk(layout, address: int) -> None:
    """Raise `Endless` when the library's own walk of the collection at `address` would never end;
    return when it ends, in an error or not (the library's error is then h5py's).

    The library steps by the same sizes as `FastLayout._heap`, but it accepts any step that stays
    inside the collection, aligned or not, and refuses only one that runs past it."""
    verdict = layout.heap_verdicts.get(address, False)  # a collection walked before: its verdict
    if verdict is False:
        verdict = layout.heap_verdicts[address] = _verdict(layout, address)
    if verdict is not None:
        raise Endless(verdict)


def _verdict(layout, address: int) -> str | None:
    """`endless_walk`'s walk: why the walk of the collection at `address` never ends, or None."""
    mm = layout._mm
    if mm[address : address + 5] != b"GCOL\x01":
        return None
    end = address + layout._length(address + 8)
    if end > layout._end:  # the library refuses a collection past the file's end
        return None
    head = (8 + layout._l + 7) // 8 * 8  # the collection's header, and each object's: 8-aligned
    pos = address + head
    while pos + head <= end:
        index = int.from_bytes(mm[pos : pos + 2], "little")
        size = layout._length(pos + 8)
        step = size if index == 0 else head + (size + 7) // 8 * 8  # free space: its own size
        if step == 0:
            return (
                f"the global heap collection at byte {address} is damaged: its object at byte "
                f"{pos} is free space of size 0, which the HDF5 library reads again without end"
            )
        if step > end - pos:
            return None
        pos += step
    return None
