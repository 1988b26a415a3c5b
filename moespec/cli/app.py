"""`moespec` entry point: registers one thin module per command.

Command modules import torch lazily, inside their functions, so that `moespec validate`
and `moespec show` start without loading it.
"""

from __future__ import annotations

import os

import typer

from moespec.cli import calibrate_cmd, compile_cmd, data_cmd, explore_cmd, export_cmd, import_cmd, profile_cmd, schema_cmd, show_cmd, simulate_cmd, train_cmd, validate_cmd

app = typer.Typer(
    name="moespec",
    help="Declare a Mixture-of-Experts transformer in YAML; validate, compile, train, simulate, profile and explore it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _check_environment() -> None:
    # A bad MOESPEC_CPU_GEMM would otherwise surface as a traceback deep in a training step;
    # cpu_gemm loads torch, so it is imported only when the variable is set.
    if os.environ.get("MOESPEC_CPU_GEMM") is not None:
        from moespec.cli.common import fail
        from moespec.model import cpu_gemm

        try:
            cpu_gemm.requested()
        except ValueError as exc:
            fail(str(exc))


app.command("validate")(validate_cmd.validate_command)
app.command("show")(show_cmd.show_command)
app.command("schema")(schema_cmd.schema_command)
app.command("compile")(compile_cmd.compile_command)
app.command("train")(train_cmd.train_command)
app.command("simulate")(simulate_cmd.simulate_command)
app.command("explore")(explore_cmd.explore_command)
app.command("profile")(profile_cmd.profile_command)
app.command("calibrate")(calibrate_cmd.calibrate_command)
app.command("import")(import_cmd.import_command)
app.command("export")(export_cmd.export_command)
app.add_typer(data_cmd.data_app, name="data")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
