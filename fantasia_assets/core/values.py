"""Checks on numbers that come from configuration files."""

from __future__ import annotations

from numbers import Real


def is_number(value: object) -> bool:
    """A real number, and not a bool: `identity: true` in a config is a mistake, not 1.0."""
    return isinstance(value, Real) and not isinstance(value, bool)
