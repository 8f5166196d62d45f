"""The run report: OUT/report.md and OUT/report.html (one self-contained page, images embedded), written by
every `slimtune run` and by `slimtune report RUN_DIR [RUN_DIR...]` (the first directory's report, with the
final models of the others as compared rows).

It shows one row per model a run produced: the starting model (every ratio's reference), each stage's
output, and the shipped artifact where one was written (an int8 run ships an ONNX Runtime graph: its speed
and size are the headline, the torch float simulation's are labelled as such); every speed figure names
the runtime that produced it. Then a Pareto plot of the primary metric against latency (marker area:
size on disk), training curves from the TensorBoard logs, the task's artifacts (a confusion matrix), the
recipe of each run and the machine. Tables and plots are built here from metrics.json; matplotlib draws
(Agg backend, no display), the HTML is plain markup with inline CSS: nothing is fetched when it is opened.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_write_bytes, atomic_write_text
from slimtune.report import distill_lines, fmt, stages_table, warnings_section
from slimtune.tasks import get_task

PARETO_PNG, CURVES_PNG = "report_pareto.png", "report_curves.png"
COLUMN_NAMES = {"accuracy": "accuracy", "f1_macro": "F1 macro", "precision_macro": "P macro",
                "recall_macro": "R macro", "perplexity": "perplexity", "params": "params (M)",
                "size_mb": "size MB", "packed_mb": "packed MB", "latency_ms_b1": "ms b=1",
                "throughput_eps": "ex/s b=32", "prefill_tokens_per_s": "prefill tok/s",
                "decode_tokens_per_s": "decode tok/s"}


@dataclass
class Row:
    """One model in the table: what it is, which run made it, and its measurement."""

    name: str
    run: str
    values: dict
    kind: str  # start | stage | shipped | compared


@dataclass
class RunRecord:
    path: Path
    metrics: dict
    recipe: str = ""
    rows: list[Row] = field(default_factory=list)


def read_run(run_dir: str | Path) -> RunRecord:
    """A finished run directory (its metrics.json marks it finished), or a one-line error naming it."""
    path = Path(run_dir).expanduser().resolve()
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise SlimtuneError(f"{path}: not a finished run directory (no metrics.json)")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        metrics["final"], metrics["stages"], metrics["task"]  # noqa: B018 (the keys every report needs)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SlimtuneError(f"{metrics_file}: not a slimtune metrics file ({type(e).__name__}: {e})") from None
    recipe = path / "recipe.yaml"
    return RunRecord(path, metrics, recipe.read_text(encoding="utf-8") if recipe.is_file() else "")


# ------------------------------------------------------------------------------------------ rows
def run_rows(record: RunRecord) -> list[Row]:
    """Start, each stage's output, and the shipped artifact of one run."""
    metrics, name = record.metrics, record.path.name
    stages, rows, final = metrics["stages"], [], metrics["final"]
    last_change = max((i for i, s in enumerate(stages) if s["stage"] != "evaluate"), default=None)
    if metrics.get("start"):
        rows.append(Row(f"start: {metrics.get('base_model', 'base model')}", name, metrics["start"], "start"))
    for i, s in enumerate(stages):
        if s["stage"] == "evaluate":
            if i == 0 and not rows:  # a recipe that opens with an evaluation measures its start
                rows.append(Row(f"start: {metrics.get('base_model', 'base model')}", name, s, "start"))
            continue
        label = f"{i}: {s['stage']}" + (f" {s['method']}" if s.get("method") else "")
        following = stages[i + 1] if i + 1 < len(stages) else None
        if "output" in s:
            values = s["output"]
        elif following is not None and following["stage"] == "evaluate":
            values = following
        elif following is None:
            values = final | final.get("simulated", {})
        else:
            values = {}
        if i == last_change:  # the saved model directory: its packed size
            values = {**values, "packed_mb": final.get("packed_mb")}
        rows.append(Row(label, name, values, "stage"))
    if final.get("artifact"):
        onnx = final.get("onnx") or {}
        rows.append(Row(f"shipped: {final['artifact']}", name,
                        {**final, "size_mb": final.get("artifact_size_mb"), "packed_mb": None,
                         "accuracy": onnx.get("onnx_accuracy", final.get("accuracy"))}, "shipped"))
    return rows


def compared_row(record: RunRecord, label: str | None = None) -> Row:
    """A compared run in one row: what it ships (the artifact where it has one)."""
    shipped = [r for r in run_rows(record) if r.kind == "shipped"]
    values = shipped[0].values if shipped else record.metrics["final"]
    return Row(label or f"{record.path.name}: final", record.path.name, values, "compared")


def latency_of(values: dict, speed_keys: tuple[str, ...]) -> tuple[float | None, str]:
    """(ms, what it is): batch-1 latency where the task measures it, else the time per unit of its last
    rate (a decoder: ms per decoded token)."""
    for key in speed_keys:
        if key.startswith("latency") and values.get(key):
            return float(values[key]), "batch-1 latency (ms)"
    rate = speed_keys[-1] if speed_keys else None
    if rate and values.get(rate):
        return 1000.0 / float(values[rate]), f"ms per unit of {COLUMN_NAMES.get(rate, rate)}"
    return None, ""


def ratios(values: dict, start: dict, speed_keys: tuple[str, ...]) -> tuple[str, str]:
    """(speed-up per speed figure, times smaller on disk) against the starting model."""
    ups = []
    for key in speed_keys:
        a, b = values.get(key), start.get(key)
        if a and b:
            faster = b / a if key.startswith("latency") else a / b  # latency: lower is faster
            ups.append(f"{faster:.2f}x")
    size, start_size = values.get("size_mb"), start.get("size_mb")
    return " / ".join(ups), (f"{start_size / size:.2f}x" if size and start_size else "")


def table(rows: list[Row], task) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the models table."""
    metric_keys = [k for k in task.final_keys if k in COLUMN_NAMES and any(r.values.get(k) is not None for r in rows)]
    speed_keys = tuple(task.speed_keys)
    start = next((r.values for r in rows if r.kind == "start"), {})
    header = ["model", *[COLUMN_NAMES[k] for k in metric_keys], "params (M)", "size MB", "packed MB",
              *[COLUMN_NAMES.get(k, k) for k in speed_keys], "runtime", "speed-up", "smaller"]
    body = []
    for r in rows:
        v = r.values
        up, smaller = ratios(v, start, speed_keys)
        body.append([r.name, *[fmt(v.get(k)) for k in metric_keys],
                     fmt(round(v["params"] / 1e6, 2)) if v.get("params") else "—", fmt(v.get("size_mb")),
                     fmt(v.get("packed_mb")), *[fmt(v.get(k)) for k in speed_keys],
                     v.get("runtime") or "—", up or "—", smaller or "—"])
    return header, body


# ----------------------------------------------------------------------------------------- plots
def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pareto_png(rows: list[Row], task) -> bytes | None:
    """Primary metric against latency, marker area by size on disk; the Pareto-optimal models joined."""
    plt = _pyplot()
    primary, up = task.primary.name, task.primary.higher_is_better
    points = []
    for r in rows:
        ms, x_label = latency_of(r.values, tuple(task.speed_keys))
        if ms is not None and r.values.get(primary) is not None:
            points.append((ms, float(r.values[primary]), float(r.values.get("size_mb") or 1.0), r.name, x_label))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.8))
    biggest = max(p[2] for p in points)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=[40 + 900 * p[2] / biggest for p in points],
               alpha=0.55, edgecolors="black")
    # each point numbered, its name in a key beside the plot: names written at the points overlap as soon
    # as a few models land close together (an int8 student and its peers)
    key = []
    for k, (ms, metric, size, name, _) in enumerate(points):
        short = name.split(":")[0] if name.startswith("start") else name
        ax.annotate(str(k + 1), (ms, metric), fontsize=8, fontweight="bold", textcoords="offset points",
                    xytext=(6, 4 - 10 * (k % 2)))
        key.append(f"{k + 1}. {short[:48]}, {size:.1f} MB")
    ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, fontsize=7, va="top", ha="left")
    front, best = [], None
    for p in sorted(points, key=lambda p: (p[0], -p[1] if up else p[1])):  # by latency, best metric first
        if best is None or (p[1] > best if up else p[1] < best):
            front.append(p)
            best = p[1]
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red", label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    if max(p[0] for p in points) > 10 * min(p[0] for p in points):  # a teacher beside int8 students
        ax.set_xscale("log")
    ax.set_xlabel(points[0][4] + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"{primary} ({'higher' if up else 'lower'} is better)")
    ax.set_title("Metric against latency (marker area: size on disk)")
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def training_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run's TensorBoard logs: tag -> [(step, value)]."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def curves_png(scalars: dict[str, list[tuple[int, float]]], primary: str) -> bytes | None:
    """Training loss and the selection-split metric, per stage (TensorBoard tags `s<i>-<stage>/...`)."""
    plt = _pyplot()
    losses = {t.rsplit("/", 1)[0]: v for t, v in scalars.items() if t.endswith("/loss")}
    evals = {t.rsplit("/", 1)[0]: v for t, v in scalars.items() if t.endswith(f"/eval_{primary}")}
    if not losses and not evals:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, series, title in ((axes[0], losses, "training loss"),
                              (axes[1], evals, f"{primary} on the selection split")):
        for tag, values in sorted(series.items()):
            ax.plot([s for s, _ in values], [v for _, v in values], marker="o" if len(values) < 30 else None,
                    markersize=3, label=tag)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    return _figure_png(fig)


# --------------------------------------------------------------------------------------- the page
def write_report(run_dir: str | Path, compare: list[str | Path] = (), metrics: dict | None = None,
                 recipe: str | None = None, compare_labels: list[str] | None = None) -> dict[str, Path]:
    """Write RUN_DIR/report.md, report.html and their PNGs. `metrics` / `recipe`: the run's, when the runner
    writes the report before metrics.json (which marks a run finished); `compare_labels`: row names of the
    compared runs (default: their directory names)."""
    path = Path(run_dir).expanduser().resolve()
    main = RunRecord(path, metrics, recipe or "") if metrics is not None else read_run(path)
    others = [read_run(c) for c in compare]
    task = get_task(main.metrics["task"])
    for other in others:
        if other.metrics["task"] != task.name:
            raise SlimtuneError(f"{other.path}: a {other.metrics['task']} run cannot be compared with "
                                f"{path} ({task.name})")
    labels = compare_labels or [None] * len(others)
    rows = run_rows(main) + [compared_row(o, label) for o, label in zip(others, labels, strict=True)]
    images = {PARETO_PNG: pareto_png(rows, task),
              CURVES_PNG: curves_png(training_scalars(path / "tb"), task.primary.name)}
    images = {name: png for name, png in images.items() if png}
    for name, png in images.items():
        atomic_write_bytes(path / name, png)
    if not images.get(PARETO_PNG) and (path / PARETO_PNG).exists():
        (path / PARETO_PNG).unlink()
    header, body = table(rows, task)
    sections = _sections(main, task)
    atomic_write_text(path / "report.md", _markdown(main, others, header, body, images, sections))
    atomic_write_text(path / "report.html", _html(main, others, header, body, images, sections,
                                                  [r.kind for r in rows]))
    return {"md": path / "report.md", "html": path / "report.html"}


def _sections(main: RunRecord, task) -> dict[str, list[str]]:
    """The markdown sections both renderings share (the HTML shows them as preformatted text)."""
    m, info = main.metrics, main.metrics.get("data", {})
    select = info.get("select_source", "the eval split")
    data = [f"- base model: `{m.get('base_model')}`; task: {task.name}",
            f"- train: `{info.get('train_file')}`",
            f"- chosen on (checkpoints, early stopping, a stage's own choices): {select}",
            f"- scored on: {info.get('eval_file') or info.get('eval_source') or 'eval split'} "
            "(every metric in the table)"]
    return {"data": data, "warnings": warnings_section(m), "stages": stages_table(m, task),
            "distill": distill_lines(m)}


def machine_lines(metrics: dict) -> list[str]:
    machine = metrics.get("machine") or {}
    libs = ", ".join(f"{k} {v}" for k, v in (machine.get("libraries") or {}).items())
    return [f"- CPU: {machine.get('cpu') or metrics['final'].get('cpu', 'not recorded')}",
            f"- cores: {machine.get('cores', '—')}; threads for speed: {metrics['final'].get('threads', '—')}",
            f"- python {machine.get('python', '—')}; {libs or 'library versions not recorded'}"]


def _markdown(main: RunRecord, others: list[RunRecord], header, body, images, s: dict) -> str:
    out = ["# slimtune run report", "", *s["data"], *s["warnings"], "", "## Models", "",
           "Ratios are against the starting model (speed-up per speed column; times smaller on disk).", "",
           "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    if PARETO_PNG in images:
        out += ["", f"![metric against latency]({PARETO_PNG})"]
    if CURVES_PNG in images:
        out += ["", "## Training curves", "", f"![training curves]({CURVES_PNG})"]
    out += ["", "## Stages", "", *s["stages"]]
    if s["distill"]:
        out += ["", "## Distillation", "", *s["distill"]]
    out += _per_class(main.metrics)
    if "confusion_matrix.png" in main.metrics.get("artifacts", []):
        out += ["", "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)",
                "(counts in `confusion_matrix.json`)"]
    for record in (main, *others):
        out += ["", f"## Recipe: {record.path.name}", "", "```yaml", record.recipe.rstrip(), "```"]
    out += ["", "## Machine", "", *machine_lines(main.metrics), ""]
    return "\n".join(out)


def _per_class(metrics: dict) -> list[str]:
    evals = [s for s in metrics["stages"] if s["stage"] == "evaluate"]
    per_class = (evals[-1] if evals else {}).get("per_class") or {}
    rows = [f"| {name} | {fmt(r.get('precision'))} | {fmt(r.get('recall'))} | {fmt(r.get('f1-score'))} "
            f"| {fmt(r.get('support'))} |" for name, r in per_class.items() if isinstance(r, dict)]
    if not rows:
        return []
    return ["", "## Per-class report", "", "| class | precision | recall | f1 | support |",
            "| --- | --- | --- | --- | --- |", *rows]


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f1f3f5}td:first-child,th:first-child{text-align:left}
tr.shipped td{font-weight:600;background:#eef7ee}tr.start td{color:#555}tr.compared td{background:#f6f3fb}
img{max-width:100%;border:1px solid #ddd}pre{background:#f6f8fa;padding:.7em;overflow:auto;font-size:12px}
.warn{color:#a40000;font-weight:600}"""


def _html(main: RunRecord, others: list[RunRecord], header, body, images, s: dict, kinds: list[str]) -> str:
    e = html.escape
    rows = "".join(f"<tr class='{kind}'>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                   for kind, row in zip(kinds, body, strict=True))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>slimtune report: {e(main.path.name)}</title>",
             f"<style>{CSS}</style></head><body><h1>slimtune run report: {e(main.path.name)}</h1>",
             "<ul>" + "".join(f"<li>{e(line[2:])}</li>" for line in s["data"]) + "</ul>"]
    if main.metrics.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{e(w)}</li>"
                                                       for w in main.metrics["warnings"]) + "</ul>")
    parts += ["<h2>Models</h2><p>Ratios are against the starting model (speed-up per speed column; times "
              "smaller on disk). Every speed figure names its runtime.</p>",
              "<table id='models'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header)
              + f"</tr></thead><tbody>{rows}</tbody></table>"]
    parts += _img(images, PARETO_PNG, "metric against latency", "pareto")
    if CURVES_PNG in images:
        parts += ["<h2>Training curves</h2>", *_img(images, CURVES_PNG, "training curves", "curves")]
    parts += ["<h2>Stages</h2>", _html_table(s["stages"])]
    if s["distill"]:
        parts += ["<h2>Distillation</h2>", *[f"<p>{e(line)}</p>" for line in s["distill"]]]
    per_class = _per_class(main.metrics)
    if per_class:
        parts += ["<h2>Per-class report</h2>", _html_table(per_class[3:])]
    confusion = main.path / "confusion_matrix.png"
    if "confusion_matrix.png" in main.metrics.get("artifacts", []) and confusion.is_file():
        parts += ["<h2>Confusion matrix</h2>", *_img({"c": confusion.read_bytes()}, "c", "confusion matrix",
                                                     "confusion")]
    for record in (main, *others):
        parts += [f"<h2>Recipe: {e(record.path.name)}</h2>", f"<pre>{e(record.recipe)}</pre>"]
    parts += ["<h2>Machine</h2><ul>" + "".join(f"<li>{e(line[2:])}</li>" for line in machine_lines(main.metrics))
              + "</ul></body></html>"]
    return "\n".join(parts)


def _html_table(markdown_rows: list[str]) -> str:
    """A markdown table (header, separator, rows; cells without '|') as an HTML table."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown_rows
             if not line.startswith("| ---")]
    head, *body = cells
    e = html.escape
    return ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
            + "</tbody></table>")


def _img(images: dict, name: str, alt: str, element_id: str) -> list[str]:
    if name not in images:
        return []
    data = base64.b64encode(images[name]).decode("ascii")
    return [f"<img id='{element_id}' alt='{alt}' src='data:image/png;base64,{data}'>"]
