"""What a memory-mapped reference matrix keeps resident in this process, and how a pass over it
gives its pages back (`release_rows`), or moves them onto a card (`onto_card`)."""

from __future__ import annotations

import mmap

import numpy as np

# rows copied to a card per step (`onto_card`): bounded host memory, 64 MiB of float16 at 1,024 dims
_CARD_ROWS = 32768


def release_rows(matrix: np.ndarray, start: int, stop: int) -> None:
    """Unmap from this process the resident pages wholly inside rows [start, stop) of a read-only
    file-backed ``np.memmap`` (the reference cache); anything else is left alone.

    A pass over a million cached references touches 2 GiB of the file, which the kernel counts in
    the process's resident set for as long as the pages stay mapped, on top of the screen's own
    16-bit operands: held twice. ``MADV_DONTNEED`` on a shared read-only mapping only drops this
    process's page-table entries; the data stay in the page cache and the file, and a later read
    (refinement gathers a few candidate rows) faults them back in with the same bytes. A
    copy-on-write (mode "c") or writable map could hold changes only its pages carry: never
    released.
    """
    handle = getattr(matrix, "_mmap", None)
    if handle is None or getattr(matrix, "mode", None) != "r" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if stop <= start or not matrix.flags.c_contiguous:
        return
    row_bytes = matrix.strides[0]
    base = np.frombuffer(handle, dtype=np.uint8, count=1).ctypes.data  # the mapping's first byte
    first = matrix.ctypes.data - base + start * row_bytes
    last = matrix.ctypes.data - base + min(stop, len(matrix)) * row_bytes
    first = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the rows only
    last = last // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        handle.madvise(mmap.MADV_DONTNEED, first, last - first)


def onto_card(source: np.memmap, device):
    """A memmapped source copied to the torch `device` as it is (same type, same bits),
    `_CARD_ROWS` rows at a time, each step's pages released from the process once copied
    (`release_rows`). torch is imported here: the numpy engine's process never needs it."""
    import torch

    dtype = torch.float16 if source.dtype == np.float16 else torch.float32  # a source is one of them
    held = torch.empty(source.shape, dtype=dtype, device=device)
    for start in range(0, len(source), _CARD_ROWS):
        stop = min(start + _CARD_ROWS, len(source))
        held[start:stop] = torch.from_numpy(np.array(source[start:stop])).to(device)
        release_rows(source, start, stop)
    return held
