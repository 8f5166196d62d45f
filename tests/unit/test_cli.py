"""The command line reads like a normal CLI: help, --version, typo suggestions, errors that name their source."""

import re

import pytest
from typer.testing import CliRunner

from slimtune import __version__
from slimtune.cli import app
from slimtune.errors import SlimtuneError

runner = CliRunner()


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["run", "eval", "predict", "export", "demo", "pack", "unpack"])
def test_help_shows_metavars_not_python_types(command):
    text = _help(command)
    assert not re.search(r"<(bool|str|int|path|float|list\[str\])>", text), text
    assert not re.search(r"\{[a-z_]+\}", text), text  # no `{recipe}` argument names


def test_help_reads_like_click():
    run = _help("run")
    assert "Usage: slimtune run [OPTIONS] RECIPE" in " ".join(run.split()) or "[OPTIONS] RECIPE" in run
    assert "KEY=VALUE" in run and "repeat" in run and "--no-resume" not in run
    predict = " ".join(_help("predict").split())
    assert "MODEL_DIR TEXT..." in predict
    export = _help("export")
    assert "--max-drop" in export and "--force" in export


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"slimtune {__version__}"
    assert runner.invoke(app, ["-V"]).output.strip() == f"slimtune {__version__}"


@pytest.mark.parametrize(("name", "suggestion"), [("minlm", "did you mean the alias 'minilm'?"),
                                                  ("MiniLM", "did you mean the alias 'minilm'?"),
                                                  ("mpent", "did you mean the alias 'mpnet'?"),
                                                  ("sentence-transformers/all-MiniLM-L6-v2",
                                                   "did you mean the alias 'minilm', its local copy?")])
def test_an_alias_typo_gets_a_suggestion(name, suggestion):
    from slimtune.models import resolve_model_path

    with pytest.raises(SlimtuneError) as e:
        resolve_model_path(name)
    assert suggestion in str(e.value) and "\n" not in str(e.value)


def test_no_suggestion_for_a_path_far_from_any_alias(tmp_path):
    from slimtune.models import resolve_model_path

    with pytest.raises(SlimtuneError) as e:
        resolve_model_path(tmp_path / "my-model")
    assert "did you mean" not in str(e.value)


def test_the_results_table_fits_80_columns_without_cutting_anything():
    from rich.console import Console

    from slimtune.evaluate import format_metrics_table

    row = {"accuracy": 0.8704, "f1_macro": 0.8702, "params": 22_713_602, "trainable_params": 22_713_602,
           "size_mb": 91.6, "latency_ms_b1": 12.34, "throughput_eps": 1251.0}
    table = format_metrics_table({"MiniLM, new head (before)": row, "MiniLM fine-tuned (after)": row}, list(row))
    console = Console(width=80, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for cell in ("0.8704", "0.8702", "22.71", "91.6", "12.3", "1,251.0", "accuracy", "macro", "b=32"):
        assert cell in text, cell
