"""Empty files made ahead of their content, in a background thread: a first run's raw CSV shards.

A lookup writes one CSV shard per query accession, thousands of small files. Creating a file
is allocating an inode, and on ext4 that can cost far more than writing the file: without a
journal (as here), the allocator passes over every free inode of the folder's block group that
was freed in the last minute (or six, while the inode table is not yet written back), reading
each one's deletion time, from the group's start, for every file. Creating N files after N
others were removed from the same group (the previous run's outputs removed by a benchmark or
a user before the next run) costs O(N²), and grows with every such run: measured here 0.5–0.8
s of CPU for 1,500 shards, against 0.02–0.03 s in a group without such inodes. The shard
folder normally lands in its parent's group, where those removed shards lay. So the staging's
model folder (`raw_results/{model}` in the staging, never published itself) is marked a top of
a hierarchy (`chattr +T`, `spread`): ext4 then places each new shard folder, whose name is
random, in a lightly used group chosen from a hash of that name, and its files' inodes are
allocated there without the long scan.

The shard file names are known once the query file is scanned, long before the shards'
content (after the search and the GO transfer). `create_ahead` starts one background thread
that creates, for each shard folder to come, its hidden temporary folder (the very folder
`exports.replace_dir` would build and swap in, named by `exports.tmp_sibling`) with every
name in it as an empty file; the kernel work runs while the search runs. `claim` hands the
folder over to the writer, which opens each shard's file whether it was made or not (without
O_EXCL: the folder is this run's own) and removes the files no query row needed; so the
finished folder is byte for byte the one a plain write builds, and it is swapped in the same
way: atomically, with nothing synced before or after, as before. Nothing is visible outside
the run's staging folder until it is published; a run that fails stops the making and removes
the folder with its staging (`discard`).

Only a folder that is not published yet is made ahead (`RunStaging.make_ahead`): a rerun's
writer links unchanged shards from the published folder, and an incremental one writes only
the changed accessions, so empty files made for them would be work to undo. The incremental
writer still spreads its staging model folder (`spread`) before it writes the rebuilt shards:
they are created right where the previous runs' replaced shards were freed (measured in the
incremental bench: 2,055 files took 2.3 s of `open` on a loaded machine, against 0.13 s spread).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(eq=False)
class Ahead:
    """The temporary folder of one target folder and the names already made in it."""

    target: Path
    folder: Path
    names: list[str]
    made: set[str] = field(default_factory=set)  # what was made (the writer lists the folder)
    stop: bool = False  # set by `claim` or `discard`: make nothing more here
    started: bool = False  # the maker took it up (set, like `stop` before it, under `_lock`)
    ready: bool = False  # the folder exists
    done: threading.Event = field(default_factory=threading.Event)


# Linux's FS_IOC_GETFLAGS, FS_IOC_SETFLAGS (the flags are an int) and FS_TOPDIR_FL ('T')
_GETFLAGS, _SETFLAGS, _TOPDIR = 0x80086601, 0x40086602, 0x00020000
_lock = threading.Lock()
_pending: dict[Path, Ahead] = {}


def create_ahead(folders: Iterable[tuple[Path, Path, Iterable[str]]]) -> None:
    """Start making (target, temporary folder, file names), one folder after the other.

    A failure (no space, no permission) only stops the making: the writer creates what is
    missing itself and reports the error then, naming its file, as without this module."""
    aheads = [Ahead(target, folder, list(names)) for target, folder, names in folders]
    if not aheads:
        return
    with _lock:
        for ahead in aheads:
            _pending[ahead.target] = ahead
    threading.Thread(target=_make, args=(aheads,), name="files-ahead", daemon=True).start()


def _make(aheads: list[Ahead]) -> None:
    try:
        for ahead in aheads:
            with _lock:
                ahead.started = not ahead.stop
            if ahead.started:
                _make_folder(ahead)
            ahead.done.set()
    except OSError:
        pass
    finally:  # however it ended, no claim waits for this thread any more
        for ahead in aheads:
            ahead.done.set()


def _make_folder(ahead: Ahead) -> None:
    ahead.folder.parent.mkdir(parents=True, exist_ok=True)
    spread(ahead.folder.parent)
    ahead.folder.mkdir()
    ahead.ready = True
    prefix = os.path.join(ahead.folder, "")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for name in ahead.names:
        if ahead.stop:
            return
        os.close(os.open(prefix + name, flags, 0o644))
        ahead.made.add(name)


def spread(parent: Path) -> None:
    """Mark `parent` (a folder of the staging) as a top of a hierarchy for ext4 (`chattr +T`).

    Its sub-folders are then placed like top-level ones, in a block group chosen from a hash of
    their (random) names among the least used, instead of the parent's group, where the previous
    runs' removed shards make every inode allocation slow (module note). The flag stays on the
    staging's folder; no published folder has it. Elsewhere than on Linux or ext4 nothing is done.
    """
    if not sys.platform.startswith("linux"):
        return
    import fcntl  # POSIX only
    import struct

    with contextlib.suppress(OSError):
        descriptor = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = struct.unpack("i", fcntl.ioctl(descriptor, _GETFLAGS, struct.pack("i", 0)))[0]
            if not flags & _TOPDIR:
                fcntl.ioctl(descriptor, _SETFLAGS, struct.pack("i", flags | _TOPDIR))
        finally:
            os.close(descriptor)


def claim(target: Path) -> Ahead | None:
    """The folder made ahead for `target`, once its making has stopped; None when there is none
    (nothing was registered, or the maker had not come to it: it never will)."""
    with _lock:
        ahead = _pending.pop(target, None)
        if ahead is None:
            return None
        ahead.stop = True
    if not ahead.started:
        return None
    ahead.done.wait()
    return ahead if ahead.ready else None


def discard(under: Path) -> None:
    """Stop making every folder under `under` (a run's staging folder about to be removed)."""
    with _lock:
        aheads = [a for target, a in _pending.items() if target.is_relative_to(under)]
        for ahead in aheads:
            del _pending[ahead.target]
            ahead.stop = True
    for ahead in aheads:
        if ahead.started:
            ahead.done.wait()
