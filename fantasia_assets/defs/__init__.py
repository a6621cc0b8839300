"""Dagster definitions, one module per family: inputs, lookup, outputs, automation, resources."""
