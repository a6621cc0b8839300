"""Pieces of the HDF5 file format that the direct query-file reader (`h5fast`) relies on: message
type codes, the exact datatype encodings it accepts, the library's metadata checksum routine,
and the library's own member lookup, string reading and member-name parsing shared with `queries`."""

from __future__ import annotations

import ctypes
import functools
import struct

import numpy as np

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# message types a dataset or group header of these files may hold; any other one means a
# feature this reader does not know, so the group goes to h5py
NIL, DATASPACE, LINK_INFO, DATATYPE, FILL_OLD, FILL, LINK = 0x0, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6
LAYOUT, GROUP_INFO, FILTERS, ATTRIBUTE, CONTINUATION = 0x8, 0xA, 0xB, 0xC, 0x10
SYMBOL_TABLE, MODIFIED, ATTRIBUTE_INFO, REFCOUNT = 0x11, 0x12, 0x15, 0x16
KNOWN = frozenset(
    {NIL, DATASPACE, LINK_INFO, DATATYPE, FILL_OLD, FILL, LINK, LAYOUT, GROUP_INFO}
    | {FILTERS, ATTRIBUTE, CONTINUATION, SYMBOL_TABLE, MODIFIED, ATTRIBUTE_INFO, REFCOUNT}
)
# messages whose body the direct reader never reads (`h5bulk`'s templates let them differ)
UNREAD = frozenset({NIL, ATTRIBUTE, MODIFIED, ATTRIBUTE_INFO, REFCOUNT})
SHARED = 0x02  # message flag: the message body is a reference to a shared object
MESSAGE_V2 = struct.Struct("<BHB").unpack_from  # type, body size, flags
# datatype messages (class+version byte, bit fields, size, properties) of H5T_IEEE_F32LE and
# H5T_IEEE_F64LE, as h5py writes numpy's '<f4' and '<f8': dtype code 0 and 1 of queries._NATIVE_LIST
FLOAT_TYPES = {
    bytes.fromhex("11201f000400000000002000170800177f000000"): (0, 4),
    bytes.fromhex("11203f000800000000004000340b0034ff030000"): (1, 8),
}
# variable-length string, NUL-terminated, UTF-8, over 1-byte characters (h5py.string_dtype())
VLEN_UTF8_HEAD = bytes.fromhex("19010100")
VLEN_CLASS = 9  # a datatype class (the low 4 bits of its first byte): variable-length
VLEN_BASE = bytes.fromhex("100000000100000000000800")
MAX_CHUNKS = 64  # continuation chunks per header: more means a damaged (looping) header


@functools.cache
def checksum_routine():
    """libhdf5's `H5_checksum_metadata` (Jenkins' lookup3) from the library h5py loaded, or None."""
    import h5py  # noqa: F401  (loads libhdf5 into this process, where the maps below find it)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libhdf5" in line and "libhdf5_hl" not in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            # PyDLL: called with the GIL held. A scan makes ~5 calls a group of a few µs each;
            # CDLL would release the GIL at each one, and while another Python thread runs (the
            # lookup reads the references and annotations beside the scan) each call then waits
            # up to a switch interval (5 ms) to take it back: 1.5 s of scan became 15 s
            routine = ctypes.PyDLL(path).H5_checksum_metadata
        except (OSError, AttributeError):
            continue
        routine.restype = ctypes.c_uint32
        routine.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32]
        # lookup3's published test value: the routine is the one the format specifies
        if routine(b"Four score and seven years ago", 30, 0) == 0x17770551:
            return routine
    return None


def plain_fill(mm, body: int, size: int) -> bool:
    """Whether the fill value message at `body` is one the library decodes when it opens the
    dataset (a version-1 header has no checksum to catch damage) and holds no value of its own."""
    version = mm[body]
    if version == 2:  # allocation time, fill time, defined, [value size, value]
        allocation, when, defined = mm[body + 1], mm[body + 2], mm[body + 3]
        if allocation > 3 or when > 2 or defined > 1:
            return False
        return not defined or (size >= 8 and not int.from_bytes(mm[body + 4 : body + 8], "little"))
    if version == 3:  # flags: allocation time, fill time; 0x10 undefined, 0x20 own value
        flags = mm[body + 1]
        return size >= 2 and not flags & ~0x0F and (flags >> 2) & 3 <= 2
    return False


def read_string(dataset) -> str:
    """The text of a string dataset (scalar, or an array of one); `TypeError` for anything else:
    an array of several strings is not a sequence, and taking one of them would be a guess."""
    import h5py

    string_type = dataset.get_type()
    if not isinstance(string_type, h5py.h5t.TypeStringID):
        raise TypeError(f"holds {string_type.dtype}, not text")
    buffer = np.empty(
        dataset.shape, dtype=h5py.string_dtype() if string_type.is_variable_str() else dataset.dtype
    )
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, buffer)
    if buffer.size == 0:
        return ""
    if buffer.size > 1:
        raise TypeError(f"holds {buffer.size} strings, not one")
    value = buffer[()] if buffer.shape == () else buffer.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value)


def link_address(group, name: str) -> int | None:
    """The header address that the library's own lookup of member `name` of an h5py group id
    finds, or None (no such member, not a hard link, or a lookup the library fails). Looked up,
    not taken from a listing: a damaged name table can list a member that a lookup misses."""
    import h5py

    try:
        info = group.links.get_info(name.encode("utf-8"))
    except (KeyError, ValueError, TypeError, RuntimeError, OSError):
        return None
    return int(info.u) if info.type == h5py.h5l.TYPE_HARD else None


def suffix_int(name: bytes, prefix: str) -> int | None:
    """The integer after `prefix` in a member name (`type_3` → 3), or None."""
    text = name.decode("utf-8", "replace")
    if not text.startswith(prefix):
        return None
    try:
        return int(text[len(prefix) :])
    except ValueError:
        return None


class Unsupported(Exception):
    """Internal to the direct reader: this object is not one it understands (h5py reads it)."""


class Endless(Unsupported):
    """A structure the HDF5 library would read without end (the direct reader's own error: h5py
    would never return one, `h5heaps`). Its text says where; the group that needs it is skipped
    with it, or the file refused when its own attributes do."""
