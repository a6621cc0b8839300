"""Parsers of the reference inputs: FASTA sequences, GOA GAF 2.1/2.2 annotations, the GO OBO.

Each parser reads a whole file (plain or gzip) before anything is written to the database,
so a corrupt file is reported with its name and line and never leaves a half-load behind.
Text is UTF-8; a leading byte order mark (as some Windows editors write) is ignored.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fantasia_assets.core.sequences import SequenceError, normalise
from fantasia_assets.errors import FantasiaError
from fantasia_assets.paths import temporary_file

from .load_report import LoadError

# SPEC §2.2: the experimental evidence codes kept by default, in order of preference when a
# protein carries the same GO term under several codes (the table keeps one per pair).
DEFAULT_EVIDENCE = ("EXP", "IDA", "IPI", "IMP", "IGI", "IEP", "TAS", "IC")
# Every evidence code GO defines (geneontology.org, "Guide to GO evidence codes"): experimental,
# high-throughput, phylogenetic, computational, author statement, curator, electronic.
GO_EVIDENCE_CODES = (
    "EXP", "IDA", "IPI", "IMP", "IGI", "IEP", "HTP", "HDA", "HMP", "HGI", "HEP", "IBA", "IBD",
    "IKR", "IRD", "ISS", "ISO", "ISA", "ISM", "IGC", "RCA", "TAS", "NAS", "IC", "ND", "IEA",
)  # fmt: skip

GAF_COLUMNS = 17
_GAF_NAMES = [
    "db", "db_object_id", "db_object_symbol", "qualifier", "go_id", "reference", "evidence_code",
    "with_from", "aspect", "db_object_name", "db_object_synonym", "db_object_type", "taxon",
    "date", "assigned_by", "annotation_extension", "gene_product_form_id",
]  # fmt: skip

# Common names of the taxa of model organisms; other taxa keep their NCBI id as organism.
ORGANISMS = {
    "9606": "Homo sapiens",
    "10090": "Mus musculus",
    "10116": "Rattus norvegicus",
    "7955": "Danio rerio",
    "7227": "Drosophila melanogaster",
    "6239": "Caenorhabditis elegans",
    "559292": "Saccharomyces cerevisiae S288C",
    "284812": "Schizosaccharomyces pombe 972h-",
    "3702": "Arabidopsis thaliana",
    "83333": "Escherichia coli K-12",
    "9031": "Gallus gallus",
    "9913": "Bos taurus",
    "9823": "Sus scrofa",
    "9615": "Canis lupus familiaris",
    "8364": "Xenopus tropicalis",
    "44689": "Dictyostelium discoideum",
}

_NAMESPACES = {
    "biological_process": "P", "molecular_function": "F", "cellular_component": "C",
    "p": "P", "f": "F", "c": "C", "bp": "P", "mf": "F", "cc": "C",
    "process": "P", "function": "F", "component": "C",
    "undefined": None,  # PIS's marker of a term without an aspect (go_terms.category is NOT NULL)
}  # fmt: skip


class InputFileError(FantasiaError, ValueError):
    """An input file is unreadable or malformed; the message names the file (and line)."""


def evidence_codes(given: str | Iterable[str]) -> tuple[str, ...]:
    """The evidence codes of `--evidence`, in order of preference, each once, upper-cased.

    Codes are separated by commas, whitespace or both (`EXP,IDA`, `"EXP IDA"`, `EXP, IDA`),
    within one string or across several. A code GO does not define is an error listing the
    ones it does: a typo would otherwise filter out, and so remove, every annotation.
    """
    parts = [given] if isinstance(given, str) else list(given)
    codes = list(dict.fromkeys(code.upper() for part in parts for code in re.split(r"[\s,]+", part) if code))
    if not codes:
        raise LoadError("--evidence lists no evidence code")
    unknown = [code for code in codes if code not in GO_EVIDENCE_CODES]
    if unknown:
        what = "is not a GO evidence code" if len(unknown) == 1 else "are not GO evidence codes"
        raise LoadError(
            f"--evidence: {', '.join(unknown)} {what}; give codes from {' '.join(GO_EVIDENCE_CODES)}, "
            "separated by commas or spaces"
        )
    return tuple(codes)


def normalise_category(value: str | None) -> str | None:
    """P/F/C from any of the spellings seen in real dumps (P, BP, biological_process, …)."""
    if value is None:
        return None
    return _NAMESPACES.get(value.strip().lower().replace(" ", "_"), value)


def read_bytes(path: str | Path) -> bytes:
    """The whole content of a plain or gzip file; truncated or corrupt gzip is an error."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
            handle.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=handle) as unzipped:
                    return unzipped.read()
            return handle.read()
    except FileNotFoundError as exc:
        raise InputFileError(f"{path}: no such file") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputFileError(f"{path}: corrupt or truncated gzip ({exc})") from exc
    except OSError as exc:  # a folder, no permission, an I/O error of the disk
        raise InputFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


_BOM = b"\xef\xbb\xbf"


def _text(path: Path, data: bytes) -> str:
    try:
        return data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def fasta_accession(header: str) -> str:
    """Accession of a FASTA header: `>P12345 …` → P12345, `>sp|P12345|NAME_HUMAN …` → P12345."""
    token = header.split(None, 1)[0] if header.strip() else ""
    parts = token.split("|")
    if len(parts) >= 3 and parts[0] in ("sp", "tr"):
        return parts[1]
    return token


def _fasta_chunks(path: Path) -> list[tuple[str, list[str], int]]:
    """(accession, sequence lines as written, header line) of every record of a FASTA file, in order."""
    text = _text(path, read_bytes(path))
    records: list[tuple[str, list[str], int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(">"):
            accession = fasta_accession(line[1:])
            if not accession:
                raise InputFileError(f"{path}:{number}: FASTA header without an identifier")
            records.append((accession, [], number))
        elif line.strip():
            if not records:
                raise InputFileError(f"{path}:{number}: sequence data before the first '>' header")
            records[-1][1].append(line)
    return records


def fasta_records(path: str | Path) -> list[tuple[str, str, int]]:
    """Every record of a FASTA file in order, duplicates included: (accession, sequence, header line).

    Sequences are upper-cased with their line breaks (LF or CRLF) removed; plain or gzip.
    """
    return [
        (accession, "".join(line.strip() for line in lines).upper(), number)
        for accession, lines, number in _fasta_chunks(Path(path))
    ]


def read_fasta(path: str | Path) -> pl.DataFrame:
    """Sequences of a FASTA file as (accession, sequence), in file order.

    Sequences follow the rule of `core.sequences` (whitespace, digits and gaps removed,
    IUPAC protein letters only); a record breaking it is an error naming file, line and record.
    An accession given twice is kept once when both records hold the same sequence, and is an
    error naming both records otherwise. A file without any record is an error.
    """
    path = Path(path)
    first: dict[str, tuple[int, str]] = {}
    accessions: list[str] = []
    sequences: list[str] = []
    chunks = _fasta_chunks(path)
    if not chunks:  # loaded as such, it would read as "no protein has a sequence"
        raise InputFileError(f"{path}: no FASTA records (no line starts with '>')")
    for accession, lines, number in chunks:
        try:
            sequence = normalise("".join(lines), f"{path}:{number}: record {accession!r}")
        except SequenceError as exc:
            raise InputFileError(str(exc)) from exc
        if accession in first:
            earlier, known = first[accession]
            if known != sequence:
                raise InputFileError(
                    f"{path}: records {accession!r} at lines {earlier} and {number} have different "
                    f"sequences ({len(known)} and {len(sequence)} residues); keep one of them"
                )
            continue
        first[accession] = (number, sequence)
        accessions.append(accession)
        sequences.append(sequence)
    return pl.DataFrame(
        {"accession": accessions, "sequence": sequences},
        schema={"accession": pl.String, "sequence": pl.String},
    )


@dataclass
class GafAnnotations:
    """The kept annotations of GAF files and what was dropped, with counts per reason."""

    kept: pl.DataFrame  # protein_id, go_id, evidence_code, aspect, taxonomy_id, gene_name, description
    covered_proteins: set[str]  # every protein named in the files, kept line or not
    skipped: dict[str, int] = field(default_factory=dict)
    # the distinct GO ids behind the reasons about terms, in file order
    skipped_terms: dict[str, list[str]] = field(default_factory=dict)


def read_gaf(
    paths: list[str | Path],
    ontology: Ontology,
    evidence: tuple[str, ...] = DEFAULT_EVIDENCE,
) -> GafAnnotations:
    """Read GOA GAF 2.1/2.2 files; keep lines with an evidence code in `evidence` and no NOT.

    GO ids are mapped to their live primary id through `ontology` (alt ids); lines naming an
    obsolete or unknown term are dropped, counted and their terms listed. `evidence` follows
    `evidence_codes` (an unknown code is an error).

    A line whose column count is not 17 (16 is accepted: trailing empty column dropped) is an
    error naming the file and line.
    """
    evidence = evidence_codes(evidence)
    frames = []
    for path in paths:
        path = Path(path)
        lines = pl.DataFrame({"line": _text(path, read_bytes(path)).splitlines()}, schema={"line": pl.String})
        lines = lines.with_row_index("number", offset=1).filter(
            (pl.col("line") != "") & ~pl.col("line").str.starts_with("!")
        )
        counts = lines.select("number", pl.col("line").str.count_matches("\t").alias("tabs") + 1)
        bad = counts.filter(~pl.col("tabs").is_in([GAF_COLUMNS, GAF_COLUMNS - 1]))
        if bad.height:
            number, columns = bad.row(0)
            raise InputFileError(
                f"{path}:{number}: GAF line has {columns} tab-separated columns, expected {GAF_COLUMNS}"
            )
        split = lines.select(pl.col("line").str.split_exact("\t", GAF_COLUMNS - 1)).unnest("line")
        frames.append(split.rename(dict(zip(split.columns, _GAF_NAMES, strict=True))).fill_null(""))
    if not frames:
        raise InputFileError("no GAF file given")
    gaf = pl.concat(frames)
    covered = set(gaf["db_object_id"].to_list())
    total = gaf.height
    skipped: dict[str, int] = {}

    negated = gaf["qualifier"].str.split("|").list.contains("NOT")
    skipped["NOT qualifier"] = int(negated.sum())
    gaf = gaf.filter(~negated)
    wanted = gaf["evidence_code"].is_in(list(evidence))
    skipped[f"evidence not in {','.join(evidence)}"] = int((~wanted).sum())
    gaf = gaf.filter(wanted)
    mapped = gaf["go_id"].replace_strict(ontology.primary, default=None, return_dtype=pl.String)
    is_obsolete = gaf["go_id"].is_in(list(ontology.obsolete))
    skipped_terms: dict[str, list[str]] = {}
    for reason, dropped in (
        ("obsolete GO term", mapped.is_null() & is_obsolete),
        ("GO id not in the ontology", mapped.is_null() & ~is_obsolete),
    ):
        skipped[reason] = int(dropped.sum())
        skipped_terms[reason] = gaf["go_id"].filter(dropped).unique(maintain_order=True).to_list()
    gaf = gaf.with_columns(go_id=mapped).filter(pl.col("go_id").is_not_null())

    rank = {code: i for i, code in enumerate(evidence)}
    kept = (
        gaf.with_columns(
            pl.col("evidence_code").replace_strict(rank, return_dtype=pl.Int32).alias("_rank"),
            pl.col("taxon").str.split("|").list.first().str.replace("^taxon:", "").alias("taxonomy_id"),
        )
        .sort("db_object_id", "go_id", "_rank", "date", maintain_order=True)
        .unique(["db_object_id", "go_id"], keep="first", maintain_order=True)
        .select(
            pl.col("db_object_id").alias("protein_id"),
            "go_id",
            "evidence_code",
            "aspect",
            "taxonomy_id",
            pl.col("db_object_symbol").alias("gene_name"),
            pl.col("db_object_name").alias("description"),
        )
    )
    skipped["same GO term again for the protein"] = gaf.height - kept.height
    assert total == sum(skipped.values()) + kept.height
    return GafAnnotations(kept=kept, covered_proteins=covered, skipped=skipped, skipped_terms=skipped_terms)


@dataclass
class Ontology:
    """Live GO terms and the mapping of every known id (alt ids included) to its live id."""

    terms: pl.DataFrame  # go_id, category, description
    primary: dict[str, str]  # any id (primary or alt) of a live term → primary id
    obsolete: set[str]
    version: str | None


def read_obo(path: str | Path) -> Ontology:
    """Parse a GO OBO file with goatools; obsolete terms are listed, not loaded."""
    from goatools.obo_parser import GODag

    path = Path(path)
    data = read_bytes(path).removeprefix(_BOM)
    if b"[Term]" not in data:
        raise InputFileError(f"{path}: not an OBO ontology (no [Term] stanza)")
    _text(path, data)  # goatools would stop at the first undecodable byte with its own error
    # goatools reads only plain files from a path: a decompressed copy under $FANTASIA_HOME/tmp,
    # which the next process start clears if this one is killed before removing it
    with temporary_file(".obo") as plain:
        plain.write_bytes(data)
        try:
            with open(os.devnull, "w") as quiet:
                dag = GODag(str(plain), optional_attrs=["def"], load_obsolete=True, prt=quiet)
        except KeyError as exc:  # goatools links is_a parents by id after reading every stanza
            raise InputFileError(
                f"{path}: malformed OBO (a term refers to {exc.args[0] if exc.args else exc!r}, "
                "which no [Term] stanza defines)"
            ) from exc
        except Exception as exc:  # goatools raises bare Exceptions on malformed stanzas
            raise InputFileError(f"{path}: malformed OBO ({exc})") from exc
    version = None
    for line in io.StringIO(data[:4096].decode("utf-8", "replace")):
        if line.startswith("data-version:"):
            version = line.split(":", 1)[1].strip()
    primary: dict[str, str] = {}
    obsolete: set[str] = set()
    rows = {}
    for go_id, term in dag.items():
        if term.is_obsolete:
            obsolete.add(go_id)
            continue
        primary[go_id] = term.item_id
        rows[term.item_id] = (normalise_category(term.namespace), term.name)
    terms = pl.DataFrame(
        {
            "go_id": list(rows),
            "category": [v[0] for v in rows.values()],
            "description": [v[1] for v in rows.values()],
        },
        schema={"go_id": pl.String, "category": pl.String, "description": pl.String},
    ).sort("go_id")
    return Ontology(terms=terms, primary=primary, obsolete=obsolete, version=version)
