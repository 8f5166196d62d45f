"""The `slimtune` command: a thin typer layer over the same functions the Python API exposes, one module per
group of commands (run_commands, model_commands, serve_commands, asset_commands) on the one `app`."""

from __future__ import annotations

import sys

import typer

from slimtune.cli.app import app
from slimtune.errors import SlimtuneError

# isort: off
# importing a module registers its commands; `--help` lists the groups in this order
from slimtune.cli import run_commands, model_commands, serve_commands, asset_commands  # noqa: F401, E402
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except SlimtuneError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
