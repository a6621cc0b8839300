"""Transformers encoders: FANTASIA's preprocessing and pooling, checked on tiny random models.

The models are built here from a config (random weights, saved with `save_pretrained`) with
a tokenizer built here too: nothing is downloaded. Expected vectors come from the library's
own forward pass on one sequence at a time, pooled as FANTASIA pools them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fantasia_assets.core.embedding import ModelUnavailableError, SequenceRecord, embed_records, load_encoder

from .helpers import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "MKVLAAGIVG", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]


def _esm_dir(path):
    from transformers import EsmConfig, EsmModel, EsmTokenizer

    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n")
    tokenizer = EsmTokenizer(str(path / "vocab.txt"))
    config = EsmConfig(
        vocab_size=len(ESM_VOCAB), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=22, pad_token_id=1, mask_token_id=len(ESM_VOCAB) - 1,
        position_embedding_type="rotary", token_dropout=False,
    )  # fmt: skip
    torch.manual_seed(0)
    EsmModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _t5_dir(path, extra_tokens=()):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for letter in "ALGVSREDTIPKFQNYMHWCX":
        vocab[letter] = len(vocab)
    for token in extra_tokens:
        vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # one token per residue, spaces or not (ProtT5 gets spaces, Ankh does not)
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=list(extra_tokens),
    )  # fmt: skip
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _library_mean(model, tokenizer, text, layer, drop_ends):
    tokens = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens, output_hidden_states=True).hidden_states[-(layer + 1)][0]
    if drop_ends:  # ESM: BOS and EOS are not residues
        hidden = hidden[1:-1]
    return hidden.mean(dim=0).numpy()


def test_esm_matches_its_forward_pass_and_chunks_long_sequences(tmp_path):
    from transformers import AutoTokenizer, EsmModel

    directory = _esm_dir(tmp_path / "tiny-esm2")
    encoder = load_encoder(str(directory), "cpu")
    assert (encoder.spec.family, encoder.spec.dim, encoder.spec.layers) == ("esm", 16, 4)
    assert encoder.spec.max_residues == 20
    model, tokenizer = EsmModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    records = [SequenceRecord(f"P{i}", s) for i, s in enumerate(SEQUENCES)]
    result = embed_records(records, encoder, [0, 2])
    assert result.chunked == ["P0", "P2"]
    for row, sequence in enumerate(SEQUENCES):
        for layer in (0, 2):
            pieces = [sequence[i : i + 20] for i in range(0, len(sequence), 20)]
            means = np.stack([_library_mean(model, tokenizer, p, layer, True) for p in pieces])
            weights = np.array([len(p) for p in pieces], dtype=np.float64)
            expected = weights @ means / weights.sum()
            np.testing.assert_allclose(result.vectors[layer][row], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "extra", "text_of"),
    [
        ("tiny-prot_t5", (), lambda s: " ".join(s.replace("U", "X").replace("Z", "X"))),
        (
            "tiny-prostt5",
            ("<AA2fold>",),
            lambda s: "<AA2fold> " + " ".join(s.replace("U", "X").replace("Z", "X")),
        ),
        ("tiny-ankh3", ("[NLU]",), lambda s: "[NLU]" + s),
    ],
)
def test_t5_family_preprocessing_matches_its_forward_pass(tmp_path, name, extra, text_of):
    from transformers import AutoTokenizer, T5EncoderModel

    directory = _t5_dir(tmp_path / name, extra)
    encoder = load_encoder(str(directory), "cpu")
    assert encoder.spec.max_residues is None
    model, tokenizer = T5EncoderModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    sequences = ["MKUAZLG", *SEQUENCES] if "ankh" not in name else SEQUENCES
    records = [SequenceRecord(f"P{i}", s) for i, s in enumerate(sequences)]
    result = embed_records(records, encoder, [0, 3])
    for row, sequence in enumerate(sequences):
        for layer in (0, 3):
            expected = _library_mean(model, tokenizer, text_of(sequence), layer, False)
            np.testing.assert_allclose(result.vectors[layer][row], expected, rtol=0, atol=1e-5)


def test_t5_maps_u_z_o_b_to_x(tmp_path):
    encoder = load_encoder(str(_t5_dir(tmp_path / "tiny-prot_t5")), "cpu")
    assert encoder.prepare("MUZOBK") == ("MXXXXK", [])


def test_a_missing_model_is_never_downloaded_and_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        ModelUnavailableError, match=r"not on this machine and nothing is downloaded.*--model DIR"
    ):
        load_encoder("prot_t5", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match=r"no config\.json"):
        load_encoder(str(tmp_path / "empty"), "cpu")
