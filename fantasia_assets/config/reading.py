"""Reading a configuration file: its text (encoding, size) and its YAML with alias expansion bounded.

Kept apart from the models (`schema`) and their flattening (`__init__`): these checks are about
the file, before any key is looked at.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import yaml

from fantasia_assets.errors import FantasiaError


class ConfigError(FantasiaError, ValueError):
    """The configuration is invalid; the message names the key."""


MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few kB; this bounds reading and parsing
MAX_YAML_NODES = 100_000  # values after alias expansion: a "billion laughs" is refused, not walked


def config_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM allowed), or UTF-16 with its BOM; a clear error otherwise."""
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a configuration file")
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a configuration file is at most {MAX_CONFIG_BYTES}")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not {'UTF-16' if utf16 else 'UTF-8'} text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None


def expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under `node` with every alias expanded (each anchor counted once per use)."""
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:
            raise ConfigError("a YAML alias refers to a value that contains it")
        return sizes[key]
    sizes[key] = -1  # in progress: an alias back to it is a cycle
    children: list = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    total = 1
    for child in children:
        total += expanded_size(child, sizes)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"more than {MAX_YAML_NODES} values once YAML aliases are expanded")
    sizes[key] = total
    return total


def refuse_duplicate_keys(node: yaml.Node, where: str, seen: set[int]) -> None:
    """A key given twice in one mapping is an error naming it and both lines: YAML itself keeps
    the last value without a word, so the first one would be ignored silently. Merge keys (``<<``)
    and keys that are not plain values are left to YAML; each node is walked once (aliases)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            refuse_duplicate_keys(child, f"{where}[{index}]", seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = (
                key.value
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge"
                else None
            )
            path = f"{where}.{name}" if where and name is not None else (name or where)
            if name is not None:
                if name in lines:
                    raise ConfigError(
                        f"key '{path}' is given twice (lines {lines[name]} and {key.start_mark.line + 1}); "
                        "keep one"
                    )
                lines[name] = key.start_mark.line + 1
            refuse_duplicate_keys(value, path or where, seen)


QUERY_EMBEDDINGS_FILE = "query_embeddings.h5"
FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fas")


def is_fasta_path(path: Path) -> bool:
    """A FASTA file by its name: .fa, .fasta, .faa or .fas, optionally gzipped (.gz)."""
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(FASTA_SUFFIXES)


def read_yaml(path: Path) -> object:
    """The YAML document of `path`, refused when it is too big or expands beyond the bound."""
    text = config_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            expanded_size(root, {})
            refuse_duplicate_keys(root, "", set())
        return yaml.safe_load(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
