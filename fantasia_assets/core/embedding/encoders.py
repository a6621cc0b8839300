"""What every embedding model offers the embedding run, and the errors a user can act on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from fantasia_assets.errors import FantasiaError

TooLong = Literal["truncate", "chunk", "skip"]


class EmbeddingError(FantasiaError, ValueError):
    """Bad embedding input or request (FASTA records, layers, options); the message names it."""


class ModelUnavailableError(FantasiaError, LookupError):
    """A model that is not on this machine; the message says where to put it."""


@dataclass(frozen=True)
class EncoderSpec:
    """A model's fixed facts.

    `layers`: how many layer indices exist (0 = last … layers - 1 = the input embedding);
    `max_residues`: the longest sequence embedded in one piece (None: no limit);
    `too_long`: the default for longer ones (truncate to the limit as FANTASIA's
    max_sequence_length does, split into chunks, or skip); `version`: the weights' identity,
    part of every cache key.
    """

    name: str
    family: str
    dim: int
    layers: int
    max_residues: int | None
    too_long: TooLong
    version: str


class Encoder(Protocol):
    spec: EncoderSpec

    def prepare(self, sequence: str) -> tuple[str, list[tuple[int, str]]]:
        """(the sequence as the model reads it, [(1-based position, character) it could not map])."""
        ...

    def embed(self, sequences: list[str], layers: list[int]) -> dict[int, np.ndarray]:
        """{layer: (len(sequences), dim) float32} mean-pooled over residues."""
        ...
