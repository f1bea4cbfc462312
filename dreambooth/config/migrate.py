"""Versioned config files: each older file dict passes through small pure dict -> dict steps
until it has the current schema."""
from __future__ import annotations

from .errors import ConfigError, Problem

SCHEMA_VERSION = 1


def _migrate_0_to_1(d: dict) -> dict:
    """Version 0 (no schema_version) named the fp16 toggle `half_model`."""
    if "half_model" in d:
        d["save_precision"] = "fp16" if d.pop("half_model") else d.get("save_precision", "fp32")
    return d


MIGRATIONS = {0: _migrate_0_to_1}


def migrate(d: dict) -> dict:
    version = d.pop("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError([Problem("schema_version", version, "is not a version number",
                                   f"use {SCHEMA_VERSION}, or leave it out for a file of "
                                   "version 0")])
    if version > SCHEMA_VERSION:
        raise ConfigError([Problem("schema_version", version, "is newer than this version "
                                   f"understands ({SCHEMA_VERSION})",
                                   "update the Dreambooth extension")])
    while version < SCHEMA_VERSION:
        d = MIGRATIONS[version](d)
        version += 1
    return d
