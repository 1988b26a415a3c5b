"""`moespec schema`: print the JSON Schema editors and CI can validate specs with."""

from __future__ import annotations

import json

import typer

from moespec.cli.common import fail


def schema_command(
    kind: str = typer.Option("spec", "--kind", help="Which schema: spec, backend, sweep or calibration."),
) -> None:
    """Print a shipped JSON Schema (2020-12) on stdout."""
    from moespec.spec.schema import SCHEMA_FILES, load_schema

    if kind not in SCHEMA_FILES:
        fail(f"unknown schema kind {kind!r}; choose one of {', '.join(SCHEMA_FILES)}")
    typer.echo(json.dumps(load_schema(kind), indent=2))
