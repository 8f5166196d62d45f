"""The typer application every command module registers on, and what they print with.

stdout carries only machine-readable results (eval's JSON, predict's JSON lines); tables,
progress and messages go to stderr. A user error is one line `error: ...` and exit code 2.
Each command imports what it needs when it runs: `slimtune --help` and a typo stay instant instead of
paying seconds for torch, transformers, peft and onnxruntime.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a pretrained language model + task data into a small, fast, accurate model.")


def _version(value: bool) -> None:
    if value:
        from slimtune import __version__

        typer.echo(f"slimtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False):
    """Turn a pretrained language model + task data into a small, fast, accurate model."""


def print_final(rows: dict[str, dict], title: str) -> None:
    from rich.console import Console

    from slimtune.evaluate import format_metrics_table

    keys = [k for k in ("accuracy", "f1_macro", "perplexity", "params", "trainable_params", "size_mb",
                        "latency_ms_b1", "throughput_eps", "prefill_tokens_per_s", "decode_tokens_per_s")
            if any(r.get(k) is not None for r in rows.values())]
    table = format_metrics_table(rows, keys)
    table.title = title
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and CI: don't squeeze the table into 80 columns
        console.width = 120
    console.print(table)
