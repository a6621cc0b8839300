"""Where the distance computation runs: the one place that decides between CUDA and the CPU."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from .timing import part


def resolve_device(backend: str, requested: str | None = None, use_gpu: bool = True) -> str:
    """ "cuda" or "cpu" for a search on `backend`.

    With `requested` None: "cuda" when the GPU is wanted (`use_gpu`), the backend is torch and a
    GPU is present, else "cpu". An explicit `requested` device is checked: CUDA only with the
    torch backend and a visible GPU.
    """
    if requested is None:
        return "cuda" if use_gpu and backend == "torch" and _cuda_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {requested!r}")
    if requested == "cuda" and backend != "torch":
        raise ValueError(f"the {backend} backend runs on the CPU; use backend='torch' for CUDA")
    if requested == "cuda" and not _cuda_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    return requested


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (a second of start-up) when the
    installed torch is a CPU build, which cannot see a GPU."""
    if not torch_has_gpu_libraries():
        return False
    with part("torch import, CUDA asked"):  # the import waits for `torch_ahead`'s, when it runs
        import torch

        return torch.cuda.is_available()


@functools.cache
def torch_has_gpu_libraries() -> bool:
    """Whether the installed torch ships a CUDA or ROCm runtime (its lib/libtorch_cuda*.so or
    libtorch_hip*.so); torch's CPU wheels have neither. True when unsure: then torch is asked."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not folder.is_dir():
        return True
    return any(folder.glob("libtorch_cuda*")) or any(folder.glob("libtorch_hip*"))
