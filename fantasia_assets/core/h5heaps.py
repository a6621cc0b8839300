"""Global heap collections that the HDF5 library would read without end, found before it reads them.

The library loads a collection whole, stepping from object header to object header by each
object's size. A free-space object (index 0) of size 0 is a step of 0: the library reads the same
header again, forever (HDF5 2.0, measured: `bench/scan.py --heaps`), inside h5py's read, where no
timeout in the process can stop it. The direct reader (`h5fast`) checks the collections that
variable-length values point into before the library reads them: a group's sequence, both for the
groups it decodes and before h5py reads one it declines (`h5plain.scan_group`), and the file's own
attributes (`queries.scan`). Such a group is skipped, or such a file refused, with `Endless`'s
text: where the collection is and which object loops. Any other damage stays the library's to
report, as h5py reports it. Not covered: attributes kept in dense storage (a fractal heap), and
files this reader does not open at all (`FastLayout.open` returns None).

The functions take an open `h5fast.FastLayout` (its memory map and the file's sizes).
"""

from __future__ import annotations

import math
import struct

from .h5bits import ATTRIBUTE, DATATYPE, LAYOUT, VLEN_CLASS, Endless, Unsupported

_FAILURES = (Unsupported, struct.error, IndexError, KeyError, ValueError, OverflowError)


def unreadable(damage: Endless | str) -> str:
    """A group's skip reason for a sequence the library would read without end."""
    return f"unreadable 'sequence' dataset ({damage})"


def endless(layout, address: int | None) -> str | None:
    """Where the library would never finish reading the dataset whose header is at `address`
    (`Endless`'s text), or None. Any variable-length dataset (an ASCII string, an array of
    strings) is checked, not only one the direct reader decodes."""
    try:
        if address is not None:
            first = {kind: body for kind, body, _ in reversed(layout._header(address))}
            if layout._mm[first[DATATYPE]] & 0x0F == VLEN_CLASS:  # its elements point into heaps
                _, where, size = layout._storage(first[LAYOUT])
                return endless_elements(layout, where, size)
    except _FAILURES:
        pass
    return None


def endless_attributes(layout, address: int) -> str | None:
    """`endless` of the attributes of the object whose header is at `address` (those kept in its
    header: compact storage, the only kind h5py writes for a few small attributes)."""
    try:
        for kind, body, size in layout._header(address):
            if kind == ATTRIBUTE and (damage := _endless_attribute(layout, body, body + size)):
                return damage
    except _FAILURES:
        pass
    return None


def _endless_attribute(layout, body: int, end: int) -> str | None:
    """`endless` of one attribute message (versions 1-3: name, datatype, dataspace, then data)."""
    mm = layout._mm
    version, flags = mm[body], mm[body + 1]
    name, datatype, dataspace = struct.unpack_from("<HHH", mm, body + 2)
    if version not in (1, 2, 3) or (version > 1 and flags & 0x03):  # flags 1, 2: a shared type or space
        return None
    align = 8 if version == 1 else 1  # version 1 pads each part to 8 bytes
    at = body + 8 + (version == 3)  # version 3: the name's character set
    type_at = at + -(-name // align) * align
    space_at = type_at + -(-datatype // align) * align
    data_at = space_at + -(-dataspace // align) * align
    if mm[type_at] & 0x0F != VLEN_CLASS:
        return None
    count = math.prod(layout._shape(space_at))
    return endless_elements(layout, data_at, min(count * (8 + layout._o), end - data_at))


def endless_elements(layout, where: int, size: int) -> str | None:
    """`endless` of variable-length values whose stored elements are the `size` bytes at `where`:
    each a length, a collection's address and an object's index."""
    mm = layout._mm
    element = 8 + layout._o
    starts = range(where, min(where + size, layout._end) - element + 1, element)
    # the library reads no heap for an empty element (length 0)
    heaps = {layout._offset(at + 4) for at in starts if mm[at : at + 4] != bytes(4)}
    try:
        for collection in sorted(heaps):
            endless_walk(layout, collection)
    except Endless as damage:
        return str(damage)
    except _FAILURES:
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
