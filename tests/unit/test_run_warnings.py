"""A run that finishes with a useless or unmeasurable model says so (issue 15, point 2)."""

import json

from slimtune.tasks.classification import TextClassification


def final(matrix, labels=("negative", "positive")) -> dict:
    n = sum(map(sum, matrix))
    accuracy = sum(matrix[i][i] for i in range(len(matrix))) / n
    return {"accuracy": accuracy, "confusion_matrix": {"labels": list(labels), "matrix": matrix}}


def test_one_class_predictions_and_no_better_than_the_majority_are_both_named():
    warnings = TextClassification().warnings(final([[0, 95], [0, 105]]))
    assert any("predicts 'positive' for all 200 eval rows" in w for w in warnings)
    assert any("does not beat the majority-class baseline 0.5250 (always 'positive')" in w for w in warnings)


def test_beating_the_majority_on_enough_rows_gives_no_warning():
    assert TextClassification().warnings(final([[400, 80], [70, 450]])) == []


def test_below_the_majority_without_collapse():
    warnings = TextClassification().warnings(final([[10, 90], [10, 890]]))
    assert len(warnings) == 1 and "majority-class baseline 0.9000" in warnings[0]


def test_a_tiny_eval_split_says_how_noisy_it_is():
    warnings = TextClassification().warnings(final([[14, 1], [2, 13]]))  # 30 rows, 0.90
    assert len(warnings) == 1 and "only 30 rows" in warnings[0] and "±11 pt (95%)" in warnings[0]
    # a perfect score on 20 rows is not exact either
    assert "only 20 rows" in TextClassification().warnings(final([[10, 0], [0, 10]]))[0]


def test_a_collapsed_run_warns_on_stderr_in_metrics_and_in_the_report(tmp_path, tiny_model_dir, sst2_small, capsys):
    import slimtune

    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32},
              # a learning rate of ~0 keeps the random head, which puts every row in one class here
              "stages": [{"stage": "finetune", "method": "head", "epochs": 1, "max_steps": 1, "lr": 1e-12},
                         {"stage": "evaluate", "speed": False}]}
    metrics = slimtune.run(recipe, tmp_path / "out", progress=False)
    assert any("eval rows: it has not learned the task" in w for w in metrics["warnings"])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Warnings" in report and "has not learned the task" in report
    assert "## Warnings" in (tmp_path / "out" / "model" / "README.md").read_text()
    assert "warning: " in capsys.readouterr().err
