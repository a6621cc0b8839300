"""The plain reader of one accession group: through the HDF5 library (h5py), object by object.

It is the reference the direct reader (`h5fast`, `h5bulk`) must equal, and it reads every group
that reader declines (`queries._scan_groups`). A group it cannot use is returned as the reason
why, which the scan records and logs; the file is still read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .h5bits import link_address, read_string, suffix_int
from .h5heaps import endless, endless_elements, unreadable
from .sequences import clean

if TYPE_CHECKING:  # imported where a group is read: a catalogued file is read without h5py
    import h5py

    from .h5fast import FastLayout

TYPE_PREFIX = "type_"
LAYER_PREFIX = "layer_"
NATIVE_DTYPES = {np.dtype("<f4"): 0, np.dtype("<f8"): 1}  # dtype code of a vector; -1: another
LayerKey = tuple[int, int | None]  # (embedding type id, layer index or None for legacy)


def vector_entry(dataset: h5py.h5d.DatasetID) -> tuple[int, int, int] | str:
    """(offset, dim, dtype code) of a 1-D float dataset, or the reason it is unusable.

    For contiguous data the length comes from the storage size (one cheap call) rather than
    the dataspace, which costs ten times more and dominates scans of big files.
    """
    dtype = dataset.get_type().dtype
    if dtype.kind != "f":
        return f"embedding has dtype {dtype}, expected float32 or float64"
    # the rank costs ~15 µs, but a (16, 16) matrix must not pass as a 256-vector; (1, n) is a vector
    if dataset.rank != 1:
        shape = dataset.shape
        if len(shape) != 2 or 1 not in shape:
            return f"embedding has shape {shape}, expected a 1-D vector"
    offset = dataset.get_offset()
    code = NATIVE_DTYPES.get(dtype, -1)
    if offset is not None:
        return (int(offset), dataset.get_storage_size() // dtype.itemsize, code)
    return (-1, int(np.prod(dataset.shape)), code)


def scan_group(
    fid: h5py.h5f.FileID, name: str, guard: FastLayout | None = None
) -> str | tuple[str, list[tuple[LayerKey, tuple[int, int, int]]], list[tuple[str, str]]]:
    """(clean sequence, vector entries, skipped parts) of one accession group, or why it is
    unusable; with `guard`, the file's direct reader, a sequence the library would read without
    end is found first (`h5heaps`)."""
    import h5py

    try:
        group = h5py.h5g.open(fid, name.encode("utf-8"))
    except (KeyError, ValueError):
        return "not a group"
    members = [group.get_objname_by_idx(i) for i in range(group.get_num_objs())]
    if b"sequence" not in members:
        return "no 'sequence' dataset"
    try:
        dataset = h5py.h5d.open(group, b"sequence")
        if guard is not None and (damage := _endless(guard, group, dataset)):
            return unreadable(damage)
        sequence = read_string(dataset)
    except (KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
        return f"unreadable 'sequence' dataset ({exc})"
    vectors: list[tuple[LayerKey, tuple[int, int, int]]] = []
    skipped: list[tuple[str, str]] = []
    for member in members:
        type_id = suffix_int(member, TYPE_PREFIX)
        if type_id is None:
            continue
        where = f"{name}/{member.decode('utf-8', 'replace')}"
        try:
            type_group = h5py.h5g.open(group, member)
        except (KeyError, ValueError):
            skipped.append((where, "not a group of layer_<k> groups (a dataset?)"))
            continue
        children = [type_group.get_objname_by_idx(i) for i in range(type_group.get_num_objs())]
        for child in children:
            if child == b"embedding":
                layer: int | None = None
                dataset_name = b"embedding"
            else:
                layer = suffix_int(child, LAYER_PREFIX)
                if layer is None:
                    continue
                dataset_name = child + b"/embedding"
            try:
                entry = vector_entry(h5py.h5d.open(type_group, dataset_name))
            except (KeyError, ValueError):
                entry = "no 'embedding' dataset"
            if isinstance(entry, str):
                skipped.append((f"{where}/{dataset_name.decode('utf-8', 'replace')}", entry))
                continue
            vectors.append(((type_id, layer), entry))
    return clean(sequence), vectors, skipped


def _endless(guard: FastLayout, group: h5py.h5g.GroupID, dataset: h5py.h5d.DatasetID) -> str | None:
    """`h5heaps.endless` of a group's sequence dataset, before h5py reads it: from its stored
    elements where they are contiguous (no parse of its header), else from its header."""
    import h5py

    kind = dataset.get_type()
    if not isinstance(kind, h5py.h5t.TypeVlenID | h5py.h5t.TypeStringID):
        return None
    if isinstance(kind, h5py.h5t.TypeStringID) and not kind.is_variable_str():
        return None  # fixed-length text: no heap
    where = dataset.get_offset()
    if where is None:  # compact (or not yet stored): the header says where its elements are
        return endless(guard, link_address(group, "sequence"))
    return endless_elements(guard, where, dataset.get_storage_size())
