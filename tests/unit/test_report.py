"""The run report: every model a run produced, each speed figure naming its runtime, the shipped int8
artifact's speed as the headline, and the page itself (report.html) rendered in headless Chromium."""

import json
import shutil
import subprocess

import pytest
from helpers import slimtune as slimtune_cli

import slimtune

FAST = {"latency_runs": 3, "throughput_batches": 1}
PIPELINE = [{"stage": "finetune", "method": "full", "epochs": 2, "lr": 1e-3, "batch_size": 16},
            {"stage": "prune", "method": "structured", "ffn": 0.5},
            {"stage": "quantize", "method": "static_int8", "calibration_batches": 2, "calibration_batch_size": 8},
            {"stage": "evaluate", **FAST}]


def recipe(tiny_model_dir, sst2_small, stages):
    return {"model": str(tiny_model_dir), "report": FAST,
            "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32},
            "stages": stages}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir, sst2_small):
    out = tmp_path_factory.mktemp("report") / "run"
    return out, slimtune.run(recipe(tiny_model_dir, sst2_small, PIPELINE), out, progress=False)


def test_a_run_measures_its_start_and_every_stage_output(pipeline_run):
    out, m = pipeline_run
    start = m["start"]
    assert start["runtime"] == "torch fp32" and start["latency_ms_b1"] > 0 and "accuracy" in start
    finetuned, pruned = m["stages"][0]["output"], m["stages"][1]["output"]  # no evaluate stage follows them
    assert finetuned["params"] == start["params"] and pruned["params"] < start["params"]
    assert "output" not in m["stages"][2]  # the evaluate stage right after measures the quantized model
    assert m["machine"]["cores"] >= 1 and "torch" in m["machine"]["libraries"]


def test_an_int8_run_headlines_the_shipped_artifacts_speed(pipeline_run):
    out, m = pipeline_run
    final = m["final"]
    assert final["runtime"] == "onnxruntime CPU (int8 graph)" and final["artifact"] == "onnx/model.onnx"
    simulated = final["simulated"]
    assert simulated["runtime"].startswith("torch (float simulation of static_int8")
    assert final["latency_ms_b1"] == final["onnx"]["latency_ms_b1"] != simulated["latency_ms_b1"]
    assert final["artifact_size_mb"] == pytest.approx((out / "onnx" / "model.onnx").stat().st_size / 1e6, rel=0.01)
    assert 0 < final["packed_mb"] < final["size_mb"]  # `slimtune pack` of the int8 codes


def test_the_int8_artifact_stores_the_embedding_tables_as_int8_codes(pipeline_run):
    import onnx
    from onnx import numpy_helper

    out, m = pipeline_run
    graph = onnx.load(str(out / "onnx" / "model.onnx"))
    gathers = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 3  # word, position and token-type tables: the torch model's own codes
    floats = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
              and not i.name.endswith("_scale") and numpy_helper.to_array(i).size >= 32 * 100]
    assert not floats, [i.name for i in floats]  # no float table left: the file is as small as the int8 weights
    assert m["final"]["artifact_size_mb"] < m["final"]["size_mb"] and m["final"]["onnx"]["parity"] == "pass"


def test_the_report_tables_every_model_with_ratios_plots_and_the_recipe(pipeline_run):
    out, m = pipeline_run
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    header = rows[0]
    assert header.startswith("| model | accuracy |") and "runtime | speed-up | smaller |" in header
    names = [r.split(" | ")[0][2:] for r in rows[1:] if r.split(" | ")[0][2:] != "#"]
    assert names[:5] == [f"start: {m['base_model']}", "0: finetune full", "1: prune structured",
                         "2: quantize static_int8", "shipped: onnx/model.onnx"]
    start_row = rows[1].split(" | ")
    assert start_row[-2:] == ["1.00x / 1.00x", "1.00x |"]  # the reference against itself
    assert "onnxruntime CPU (int8 graph)" in rows[5] and "torch (float simulation" in rows[4]
    assert "chosen on (checkpoints, early stopping, a stage's own choices): held back from train" in md
    assert "![metric against latency](report_pareto.png)" in md and (out / "report_pareto.png").is_file()
    assert "![training curves](report_curves.png)" in md  # the finetune stage's loss and selection metric
    assert "```yaml\n" in md and "static_int8" in md and "avx" in md.split("## Machine")[1] or "CPU" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # Pareto, curves, confusion matrix: all embedded
    assert "<table id='models'>" in page and "src='http" not in page and "href=" not in page


def test_report_command_compares_runs_and_refuses_what_is_not_a_run(pipeline_run, tmp_path, tiny_model_dir,
                                                                     sst2_small):
    out, _ = pipeline_run
    other = tmp_path / "plain"
    slimtune.run(recipe(tiny_model_dir, sst2_small, [PIPELINE[0], {"stage": "evaluate", **FAST}]), other,
                 progress=False)
    proc = slimtune_cli("report", other, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (other / "report.md").read_text()
    assert f"| {out.name}: final |" in md and "onnxruntime CPU (int8 graph)" in md
    assert f"## Recipe: {out.name}" in md
    (tmp_path / "empty").mkdir()
    bad = slimtune_cli("report", tmp_path / "empty")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'}: not a finished run directory (no metrics.json)"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    bad = slimtune_cli("report", tmp_path / "broken")
    assert bad.returncode == 2 and "broken/metrics.json: not a slimtune metrics file" in bad.stderr


CHECK = """<script>window.addEventListener('load', () => {
  const rows = document.querySelectorAll('#models tbody tr').length;
  const images = [...document.images].map(i => i.id + ':' + i.naturalWidth + 'x' + i.naturalHeight);
  const out = document.createElement('pre'); out.id = 'check';
  out.textContent = JSON.stringify({rows, images});
  document.body.appendChild(out);
});</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test "
                    "installs it: apt-get install chromium)")
def test_the_page_renders_its_table_and_images_in_headless_chromium(pipeline_run, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    out, _ = pipeline_run
    page = tmp_path / "page.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000", "--window-size=1280,1800"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = json.loads(dom.stdout.split("<pre id=\"check\">")[1].split("</pre>")[0])
    assert check["rows"] == 5
    sizes = dict(i.split(":") for i in check["images"])
    assert set(sizes) == {"pareto", "curves", "confusion"}
    assert all(int(s.split("x")[0]) > 300 for s in sizes.values())  # decoded, not broken-image icons
    shot = tmp_path / "page.png"
    proc = subprocess.run([*flags, f"--screenshot={shot}", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1800, 1280)
    colourful = np.abs(pixels - pixels.mean(-1, keepdims=True)).sum(-1) > 0.15  # not grey: the plots' colours
    assert colourful.mean() > 0.002 and (pixels < 0.5).mean() > 0.005  # text and plot ink, not a blank page
    shutil.copy(shot, out / "report_screenshot.png")  # for a person to look at
