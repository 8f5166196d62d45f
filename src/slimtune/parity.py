"""How close an exported int8 graph is to its torch model: a measurement, and the export's policy on it.

The measurement (the task's `compare_outputs`) is stored in `export.json` whatever the verdict. It is made
on labelled rows, in this order of preference:
1. the rows the caller passes (the runner: its eval split);
2. `--data FILE` (up to `sample_size` rows);
3. the rows the model's own run held back from training, when MODEL_DIR is `RUN/model` of a finished
   `slimtune run` (its recipe.yaml says which rows those were);
4. otherwise sentences of random vocabulary tokens. Their argmax agreement says little either way (a
   model that predicts one class agrees 100%; a real one can agree 93% and lose nothing on real text),
   so it is shown as a warning and never decides.

The policy: the int8 graph may lose at most `max_drop` points of the task's primary metric on those rows.
Every verdict carries the rows' own noise (the 95% interval of the drop), and a miss says what to try.

A task that checks its graph itself (`OnnxSignature.check`: a decoder runs greedy generations of torch
and of the graph, its KV cache fed back) is held to `greedy_verdict`: the generations must be identical
token for token. A float graph that generates differently is wrong, whatever its logits' distance; the
max |logit difference| is reported beside the verdict, not judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from slimtune.batching import EncodedDataset
from slimtune.errors import SlimtuneError
from slimtune.models import preprocessing_of
from slimtune.tasks import task_of_model

DEFAULT_MAX_DROP_PT = 0.5
# a decoder's int8 / int4 weights: the perplexity may rise this many percent over torch's on the same text.
# ORT's int8 kernels quantize the activations too (accuracy_level 4); int8 weights in blocks of 32 rose 0.5%
# on SmolLM2 (docs/benchmarks.md)
DEFAULT_MAX_RISE_PCT = 2.0


@dataclass
class ParitySample:
    """The rows parity is measured on and where they come from (shown in every message)."""

    rows: EncodedDataset
    labelled: bool
    source: str


def parity_sample(path: Path, model, tokenizer, data: Path | None, size: int) -> ParitySample:
    """`--data`, else the run's held-back rows, else random text (see the module docstring)."""
    task = task_of_model(model.config)
    if data is not None:
        ds = task.eval_dataset(Path(data), tokenizer, model.config, preprocessing_of(path))
        return ParitySample(ds.subset(range(min(size, len(ds)))), True, f"{min(size, len(ds))} rows of {data}")
    held_back = held_back_rows(path, model, tokenizer)
    if held_back is not None:
        return held_back
    return ParitySample(random_text(tokenizer, size), False, f"{size} sentences of random tokens")


def held_back_rows(path: Path, model, tokenizer) -> ParitySample | None:
    """The eval split of the finished run whose `model/` directory `path` is: rows it never trained on
    (held out of the train file, or the recipe's eval file). None when `path` is not such a directory."""
    run = Path(path).resolve().parent
    recipe_file = run / "recipe.yaml"
    if Path(path).resolve().name != "model" or not (run / "metrics.json").is_file() or not recipe_file.is_file():
        return None
    try:
        raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        data = task_of_model(model.config).data_config(**raw["data"])
        if "augment" in type(data).model_fields:
            data = data.model_copy(update={"augment": None})  # the split only, no copies
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise SlimtuneError(f"{recipe_file}: cannot read the run's data section to find its held-back rows "
                            f"({' '.join(str(e).split())[:200]}); pass --data FILE") from None
    outputs = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    try:
        ds = task_of_model(model.config).prepare_data(data, tokenizer, outputs).eval
    except SlimtuneError as e:
        raise SlimtuneError(f"{e} (reading the held-back rows of the run {run}; pass --data FILE instead)") from None
    info = json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("data", {})
    where = (f"the eval file {data.eval}" if data.eval is not None
             else f"held out of {data.train}")
    return ParitySample(ds, True, f"{len(ds)} rows the run did not train on ({where}"
                        + (f", {info['eval_rows']} in its report" if info.get("eval_rows") not in (None, len(ds))
                           else "") + ")")


def random_text(tokenizer, size: int) -> EncodedDataset:
    """Sentences of 4-40 random vocabulary tokens between the tokenizer's specials: exercises every
    layer for logit parity, but is not text (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 30000)) if i not in specials]
    ids = []
    for n in torch.randint(4, 40, (size,), generator=gen).tolist():
        words = [vocab[j] for j in torch.randint(0, len(vocab), (n,), generator=gen).tolist()]
        ids.append([t for t in (tokenizer.cls_token_id,) if t is not None] + words
                   + [t for t in (tokenizer.sep_token_id,) if t is not None])
    return EncodedDataset(input_ids=ids, labels=[0] * size)


def verdict(measured: dict, sample: ParitySample, max_drop: float, primary: str) -> dict:
    """`measured` (the task's comparison) plus `parity` (pass / fail / unchecked) and a one-line detail."""
    if not sample.labelled:
        return measured | {"parity": "unchecked", "parity_detail": (
            f"argmax agreement {measured['agreement']:.3f} on {sample.source} (not a check: pass --data FILE, "
            "or export RUN/model of a slimtune run, to measure accuracy)")}
    drop, noise = measured["drop_pt"], measured["drop_interval_pt"]
    detail = (f"{primary} {measured[f'onnx_{primary}']:.4f} vs torch {measured[f'torch_{primary}']:.4f} "
              f"({drop:+.2f} pt, max {max_drop:g} pt; ±{noise:.2f} pt 95% on {sample.source}; "
              f"{measured['changed']} of {measured['rows']} predictions changed)")
    return measured | {"parity": "pass" if drop <= max_drop else "fail", "parity_detail": detail}


def greedy_verdict(measured: dict) -> dict:
    """`measured` (slimtune.onnx_decoder.greedy_parity) plus `parity` (pass: every prompt's greedy tokens
    identical) and a one-line detail."""
    same = "identical" if measured["identical"] else (
        f"differ on {measured['prompts_differing']} of {measured['prompts']} prompts (first: "
        f"{measured['first_difference']})")
    detail = (f"greedy generations {same}: {measured['prompts']} prompts, up to {measured['new_tokens']} new tokens "
              f"each, {measured['tokens_compared']} tokens compared with torch; max |logit diff| "
              f"{measured['max_abs_logit_diff']:.2e}")
    return measured | {"parity": "pass" if measured["identical"] else "fail", "parity_detail": detail}


def perplexity_verdict(measured: dict, sample: ParitySample, max_rise: float) -> dict:
    """`measured` (slimtune.onnx_nbits.perplexity_comparison) plus `parity` (pass: the graph's perplexity
    rises at most `max_rise` percent over torch's) and a one-line detail."""
    detail = (f"perplexity {measured['onnx_perplexity']:.3f} vs torch {measured['torch_perplexity']:.3f} "
              f"({measured['rise_pct']:+.2f}%, max {max_rise:g}%; ±{measured['rise_interval_pct']:.2f}% 95% on "
              f"{measured['tokens']} tokens of {sample.source})")
    return measured | {"parity": "pass" if measured["rise_pct"] <= max_rise else "fail", "parity_detail": detail}


def miss_hint(mode: str, report: dict, sample: ParitySample, max_drop: float) -> str:
    """What to try when an int8 graph misses the policy."""
    tries = []
    if mode == "dynamic":
        tries.append("--quantize static --data FILE (activation ranges calibrated on your text)")
    tries.append("quantizing in a run with `stage: quantize, method: static_int8, weight_scales: per_channel` "
                 "and exporting that model")
    if report.get("drop_pt", 0) <= report.get("drop_interval_pt", 0):
        tries.append(f"more labelled rows (--data): the drop is within the noise of {report.get('rows')} rows")
    tries.append(f"--max-drop PT to accept more than {max_drop:g} pt, or --force to keep this graph anyway")
    return "try " + "; or ".join(tries)
