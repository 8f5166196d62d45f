"""The training half of `stage: quantize`: methods `binary`, `ternary` and `qat` (the fake-quant modules
are in `slimtune.quantize.qat`). Part of the quantize stage, not a stage of its own.

Order: refuse an unmerged adapter and keep the stage-start weights (a killed stage restarts from them);
measure the start metric and the post-training-quantized baseline QAT has to beat; swap in the
fake-quant modules; tune lr / batch size auto on the model as it trains; train on the one loop,
distilled from the full-precision model by default; convert to real quantized modules.
"""

from __future__ import annotations

import copy

from torch import nn

from slimtune.distill.losses import online_distill_loss
from slimtune.quantize.qat import convert_qat_, prepare_qat_, weight_spec
from slimtune.quantize.targets import quantize_targets, word_embedding_name
from slimtune.stages.base import Run, count_params, open_compression
from slimtune.train import seed_everything


def run_quantization_aware(run: Run, cfg) -> dict:
    """`cfg`: a QATQuantize or LowBitQuantize config (slimtune.stages.quantize)."""
    primary = run.task.primary.name
    start = open_compression(run, "quantize")
    model = run.model
    tcfg = cfg.train
    spec = weight_spec(cfg.method, getattr(cfg, "bits", 8), getattr(cfg, "group_size", None),
                       getattr(cfg, "symmetric", True))
    targets = list(quantize_targets(model, cfg.targets, cfg.ignore, getattr(cfg, "group_size", None)))
    embedding = word_embedding_name(model) if cfg.embeddings else None

    ptq = copy.deepcopy(model)  # quantized without training: what QAT has to beat
    prepare_qat_(ptq, targets, spec, embedding)
    convert_qat_(ptq, cfg.method)
    ptq_metric = run.primary_metric(ptq)
    del ptq

    teacher = copy.deepcopy(model).eval().requires_grad_(False) if tcfg.distill_from_full else None
    trained = count_params(model, trainable_only=True)  # latent weights included
    prepare_qat_(model, targets, spec, embedding)
    seed_everything(cfg.seed)
    loss_fn = run.task.loss if teacher is None else _soft_targets_of(teacher, tcfg)
    lr, bs = run.resolve_auto(tcfg, model, loss_fn)
    res = run.fit(model, tcfg, lr=lr, batch_size=bs, loss_fn=loss_fn)
    report = convert_qat_(model, cfg.method)
    return {"stage": "quantize", "method": cfg.method, "bits": spec["bits"], "scheme": spec["scheme"],
            "group_size": getattr(cfg, "group_size", None), "embeddings": cfg.embeddings,
            "distilled": tcfg.distill_from_full, f"start_{primary}": start.metric,
            f"{primary}_before_training": ptq_metric, primary: run.primary_metric(model),
            "epochs_run": res.epochs_run, "train": res.summary(), "layers": report,
            "trainable_params": trained, "trainable_pct": round(100 * trained / start.params, 2)}


def _soft_targets_of(teacher: nn.Module, tcfg):
    return online_distill_loss(teacher, tcfg.temperature, tcfg.alpha)  # soft targets of the fp32 model
