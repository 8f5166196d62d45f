"""Commands around a served model: serve, status, learn (continual learning from its feedback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimtune.cli.app import app

PANEL = "Serve and keep learning"


@app.command("serve", rich_help_panel=PANEL)
def serve_cmd(
    model_dir: Annotated[str, typer.Argument(help="model directory, exported ONNX directory, or alias",
                                             metavar="MODEL_DIR")],
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the server to the network")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=0, max=65535)] = 8000,
    token: Annotated[str | None, typer.Option(envvar="SLIMTUNE_TOKEN", show_default=False,
                                              help="require `Authorization: Bearer TOKEN` on every route but "
                                                   "/health (env SLIMTUNE_TOKEN)")] = None,
    max_batch: Annotated[int | None, typer.Option(help="texts per model call at most (1: no batching; default: 32 "
                                                       "in torch, 1 for an ONNX graph, where batching was slower)",
                                                  min=1, show_default=False)] = None,
    max_wait_ms: Annotated[float, typer.Option(help="how long the first queued text may wait for others while the "
                                               "model is idle (0: run at once; texts that arrive while the "
                                               "model is busy are batched anyway)", min=0.0)] = 0.0,
    max_queue: Annotated[int, typer.Option(help="texts (or prompts) waiting at most; a full queue answers 429",
                                           min=1)] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="request body cap (413 above it)", min=1)] = 1 << 20,
    max_text_chars: Annotated[int, typer.Option(help="characters per text (422 above it)", min=1)] = 10_000,
    feedback: Annotated[str | None, typer.Option(help='SQLite file /v1/feedback stores into ("" turns it off)',
                                                 metavar="DB")] = "feedback.sqlite",
    threads: Annotated[int | None, typer.Option(help="threads of the model's kernels (default: all cores)",
                                                min=1)] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
):
    """Serve a model over HTTP: /v1/classify (dynamic batching) or /v1/generate (server-sent events),
    /v1/feedback, /metrics, /health, the playground page at /, OpenAPI at /docs, /admin/reload (or SIGHUP)."""
    from slimtune.serve.app import ServeOptions, run_server

    run_server(ServeOptions(model_dir=model_dir, token=token or None, max_batch=max_batch, max_wait_ms=max_wait_ms,
                            max_queue=max_queue, max_body_bytes=max_body_bytes, max_text_chars=max_text_chars,
                            feedback=feedback or None, threads=threads), host=host, port=port, log_level=log_level)


@app.command("status", rich_help_panel=PANEL)
def status_cmd(
    url: Annotated[str, typer.Argument(help="the server, e.g. http://127.0.0.1:8000", metavar="URL")],
    token: Annotated[str | None, typer.Option(envvar="SLIMTUNE_TOKEN", show_default=False,
                                              help="the server's bearer token (env SLIMTUNE_TOKEN)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
):
    """A running server's model version, queue and drift signals (rolling confidence, feedback disagreement)."""
    from slimtune.server_client import fetch_status

    status = fetch_status(url, token)
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return
    feedback = status.get("feedback") or {}
    rows = [("model", f"{status['model_version']} ({status['kind']}, {status['runtime']})"),
            ("directory", status["model_dir"]), ("up", f"{status['uptime_s']:.0f} s"),
            ("queue", f"{status['queue_depth']} texts"),
            ("rolling confidence", _fmt_share(status.get("rolling_confidence"))
             + f" over {status.get('predictions_seen', 0)} predictions"),
            ("feedback disagreement", _fmt_share(feedback.get("disagreement"))
             + f" over {feedback.get('recent_rows', 0)} rows")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        sys.stdout.write(f"{key:<{width}}  {value}\n")


def _fmt_share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@app.command("learn", rich_help_panel=PANEL)
def learn_cmd(
    model_dir: Annotated[str, typer.Argument(help="the serving classifier: RUN/model of a run, a version "
                                             "(DIR/current), or any classifier directory", metavar="MODEL_DIR")],
    feedback: Annotated[Path, typer.Option("--feedback", help="the feedback store (SQLite) the server writes; read "
                                           "only", metavar="DB")],
    out: Annotated[Path, typer.Option("--out", "-o", help="versions directory: vNNNN/ model directories and the "
                                      "`current` symlink", metavar="DIR")],
    replay: Annotated[Path | None, typer.Option(help="original training rows to mix in against forgetting (default: "
                                                "the training data of the run MODEL_DIR comes from)",
                                                metavar="DATA")] = None,
    eval_: Annotated[Path | None, typer.Option("--eval", help="the old eval set forgetting is judged on (default: the "
                                               "run's eval split)", metavar="DATA")] = None,
    max_forget: Annotated[float, typer.Option(help="accuracy points on the old eval set a new version may lose and "
                                              "still be promoted", metavar="PT", min=0.0)] = 1.0,
    epochs: Annotated[float, typer.Option(help="fine-tuning epochs over feedback + replay", metavar="N",
                                          min=0.01)] = 2.0,
    lr: Annotated[float, typer.Option(help="learning rate (full fine-tune)", metavar="LR", min=0.0)] = 2e-5,
    replay_ratio: Annotated[float, typer.Option(help="replayed training rows per feedback row (0: none)",
                                                metavar="R", min=0.0)] = 4.0,
    min_new: Annotated[int, typer.Option(help="new feedback rows needed to learn at all", metavar="N", min=1)] = 1,
    batch_size: Annotated[int, typer.Option(help="training batch size", metavar="N", min=1)] = 16,
    seed: Annotated[int, typer.Option(help="seed of the replay sample and the training", metavar="N")] = 0,
    watch: Annotated[bool, typer.Option("--watch", help="keep polling the store; learn every --every new rows")
                     ] = False,
    every: Annotated[int, typer.Option(help="--watch: new rows that trigger a learn", metavar="N", min=1)] = 100,
    poll_seconds: Annotated[float, typer.Option(help="--watch: seconds between polls", metavar="S", min=0.1)] = 30.0,
    server: Annotated[str | None, typer.Option(help="after a promotion, POST URL/admin/reload with the new version",
                                               metavar="URL")] = None,
    token: Annotated[str | None, typer.Option(envvar="SLIMTUNE_TOKEN", show_default=False, metavar="TOKEN",
                                              help="the server's bearer token (env SLIMTUNE_TOKEN)")] = None,
):
    """Fine-tune a classifier on the feedback it collected, mixed with replayed training rows, into DIR/vNNNN;
    promote it (DIR/current) unless it lost more than --max-forget points on the old eval set. Exit codes:
    0 promoted, 1 too few new feedback rows (no version), 2 an error, 3 written but not promoted."""
    from slimtune import learn as learning

    settings = {"replay": replay, "eval_data": eval_, "max_forget": max_forget, "epochs": epochs, "lr": lr,
                "replay_ratio": replay_ratio, "min_new": min_new, "batch_size": batch_size, "seed": seed}
    with learning.sigterm_interrupts():  # a terminated learn cleans up as Ctrl-C does: no version, current unchanged
        if watch:
            learning.watch(model_dir, feedback, out, every=every, poll_seconds=poll_seconds, server=server, token=token,
                       **settings)
            return
        try:
            result = learning.learn(model_dir, feedback, out, **settings)
        except learning.NothingToLearn as e:
            typer.echo(f"nothing to learn: {e}", err=True)
            raise typer.Exit(learning.EXIT_NOTHING_NEW) from None
    typer.echo(learning.report_markdown(result.record), err=True)  # the before/after table, and where from
    if result.promoted and server:
        typer.echo(learning.reload_server(server, out / "current", token), err=True)
    sys.stdout.write(json.dumps({k: result.record[k] for k in ("version", "promoted", "forget_pt", "before", "after")}
                                | {"path": str(result.path)}) + "\n")
    if not result.promoted:
        raise typer.Exit(learning.EXIT_NOT_PROMOTED)
