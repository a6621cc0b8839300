"""Where the distance computation runs: the one place that decides between CUDA and the CPU."""

from __future__ import annotations


def resolve_device(backend: str, requested: str | None = None, use_gpu: bool = True) -> str:
    """ "cuda" or "cpu" for a search on `backend`.

    With `requested` None: "cuda" when the GPU is wanted (`use_gpu`), the backend is torch and a
    GPU is present, else "cpu". An explicit `requested` device is checked: CUDA only with the
    torch backend and a visible GPU.
    """
    import torch

    if requested is None:
        return "cuda" if use_gpu and backend == "torch" and torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {requested!r}")
    if requested == "cuda" and backend != "torch":
        raise ValueError(f"the {backend} backend runs on the CPU; use backend='torch' for CUDA")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    return requested
