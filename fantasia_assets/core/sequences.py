"""The one rule for protein sequence text, applied to references at load and to queries at lookup.

Rule (README, "Sequences"):

* whitespace (spaces, tabs, line breaks), digits (the position numbers of GenBank or
  Clustal-style text) and the gap characters ``-`` and ``.`` of alignments are removed;
* the stops ``*`` ending the sequence (as TransDecoder and other translations write them) are
  dropped, so a protein gets the same sequence, alignments and vector with or without them;
* letters are upper-cased; every remaining character must be an IUPAC protein letter
  (A–Z: the 20 standard residues, U selenocysteine, O pyrrolysine, and the ambiguity codes
  B, Z, J, X) or ``*``, a stop inside the sequence;
* anything else (``#``, ``>``, a letter outside ASCII, ...) makes the sequence unusable, and
  so does a sequence left empty.

A reference with an unusable sequence is refused at load, naming the record. A query with one
is still searched (its embedding is what is searched), but cannot be aligned or clustered:
its alignment metrics are left empty and a warning names it.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Iterable
from pathlib import Path

from fantasia_assets.errors import FantasiaError

log = logging.getLogger(__name__)

PROTEIN_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ*")
# removed before checking: whitespace, digits, alignment gaps
_REMOVED = re.compile(r"[\s0-9.\-]+")
_UNUSABLE = re.compile(r"[^A-Z*]")
_PLAIN = re.compile(r"[A-Z*]+")
_PLAIN_ASCII = string.ascii_uppercase.encode("ascii") + b"*"  # the characters of _PLAIN
# ASCII letters only: str.upper() would turn 'ß' into 'SS' and 'ı' into 'I', forging residues
_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


class SequenceError(FantasiaError, ValueError):
    """A sequence breaks the rule above; the message names the record and the character."""


def clean(text: str) -> str:
    """`text` upper-cased with whitespace, digits, gaps and ending stops removed (not yet checked)."""
    if not _PLAIN.fullmatch(text):  # the common case is one C-level scan: nothing to change
        text = _REMOVED.sub("", text).translate(_UPPER)
    return text.rstrip("*") if text.endswith("*") else text


def clean_many(texts: list[str]) -> list[str]:
    """`clean` of each text. Most query files hold clean sequences only: one C-level pass over
    them all recognises that (~1 ns a residue, where the regular expression costs a few)."""
    joined = "".join(texts)
    if joined.isascii() and not joined.encode("ascii").translate(None, _PLAIN_ASCII):
        if "*" not in joined:
            return texts  # only A-Z: `clean` returns each text as it is
        return [text.rstrip("*") for text in texts]
    return [clean(text) for text in texts]


def problem(cleaned: str) -> str | None:
    """Why an already `clean`ed sequence is unusable (one phrase), or None when it is usable."""
    if not cleaned:
        return "empty sequence (no residue left after removing whitespace, digits, gaps and ending stops)"
    bad = _UNUSABLE.search(cleaned)
    if bad is None:
        return None
    return (
        f"character {bad.group()!r} at residue {bad.start() + 1} is not an IUPAC protein letter "
        "(A-Z, or '*' for a stop)"
    )


def normalise(text: str, record: str) -> str:
    """The clean sequence of `record`; `SequenceError` naming the record when it is unusable."""
    cleaned = clean(text)
    reason = problem(cleaned)
    if reason is not None:
        raise SequenceError(f"{record}: {reason}")
    return cleaned


def usable(cleaned: str) -> bool:
    """Whether an already `clean`ed sequence can be aligned and clustered."""
    return problem(cleaned) is None


def warn_unusable_queries(path: Path, groups: Iterable[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """Warn about, and return as (group, reason), the queries of `path` whose clean sequence is unusable.

    They stay in the lookup: their embedding is what is searched. Only what needs the sequence
    itself is left out for them: alignment metrics (left empty) and redundancy masking.
    """
    found = []
    for group, sequence in groups:
        reason = problem(sequence or "")
        if reason is not None:
            found.append((group, reason))
            log.warning(
                "%s: %s: %s; it is still searched, but its alignment metrics are left empty and "
                "redundancy masking does not apply to it",
                path, group, reason,
            )  # fmt: skip
    return found


def fasta_named_otherwise(path: Path) -> str:
    """A hint for an HDF5 that could not be opened but holds FASTA text ('>' first, plain or
    gzip), or "": FASTA query files are recognised by their name (`config.is_fasta_path`)."""
    import gzip

    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(0)
            if head[:2] == b"\x1f\x8b":
                head = gzip.GzipFile(fileobj=handle).read(4)
    except (OSError, EOFError, ValueError):
        return ""
    if not head.lstrip(b"\xef\xbb\xbf").startswith(b">"):
        return ""
    return (
        "; it holds FASTA text: name it .fa, .fasta, .faa or .fas (gzipped or not) to have it "
        "embedded, and give its models an embed_with"
    )
