"""`stage: quantize` — post-training quantization of the encoder's Linear weights (and, with
`embeddings: true`, the word embeddings as int8 with one scale for the table); QAT methods live in
`slimtune.quantize.qat`.

  dynamic_int8  int8 weights per output channel (symmetric or asymmetric), int8 activations quantized
                per call from their own range (ONNX Runtime's dynamic quantization, simulated exactly)
  static_int8   int8 weights, activation ranges calibrated once on train batches (ORT's MinMax)
  weight_only   int8 / int4 weights, per channel or per group; rtn, gptq or awq
  fixed_point   Qm.n weights (sign + m integer + n fraction bits), saturating; per-layer error reported
  mixed         per-layer widths from a sensitivity analysis under a size budget, then RTN
  binary / ternary / qat  trained with fake quantization (slimtune.quantize.qat)

The quantized model saves with save_pretrained and `slimtune.load_model` rebuilds it (the saved
form is described in `slimtune.quantize.core`). A LoRA adapter is merged first. On --resume past a finished
quantize stage, the quantized modules are rebuilt from the spec kept in the run state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.prune.stage import _calibration as prune_calibration
from slimtune.prune.unstructured import select_linears
from slimtune.quantize.core import (
    CONFIG_KEY,
    apply_quantization_skeleton_,
    calibrate_activations_,
    layer_spec,
    quantize_,
    quantized_size_bytes,
)
from slimtune.recipe import QuantizeStage
from slimtune.train import default_eval_fn, seed_everything

if TYPE_CHECKING:
    from slimtune.runner import RunState

METHOD_BITS = {"weight_only": (8, 4), "qat": (8, 4), "dynamic_int8": (8,), "static_int8": (8,)}
MIXED_BITS = (2, 3, 4, 8)
QAT_METHODS = ("binary", "ternary", "qat")
INT8_ACTIVATIONS = ("dynamic_int8", "static_int8")  # ONNX Runtime integer matmuls: weight_scales applies
NO_GROUPS = (*INT8_ACTIVATIONS, "fixed_point")  # ORT int8 has no weight groups; Qm.n has no scale


# ------------------------------------------------------------------------------------ validation
# 8 bits with ONE scale and zero point for the whole table, as ONNX Runtime quantizes an embedding
# Gather (uint8, asymmetric, per tensor): the torch simulation then matches the deployed graph, and
# most entries, small next to the table's extremes, use few distinct codes, which the packer stores
# in fewer bits than with a scale per row.
EMBEDDING_SPEC = layer_spec(kind="embedding", bits=8, scheme="asymmetric", per_tensor=True)


def check_config(cfg: QuantizeStage) -> None:
    """Checks that need the stage config only."""
    method, explicit = cfg.method, cfg.model_fields_set
    if "weight_scales" in explicit and cfg.weight_scales != "per_channel" and method not in INT8_ACTIVATIONS:
        raise SlimtuneError(f"quantize: weight_scales {cfg.weight_scales} applies to dynamic_int8 / static_int8, "
                            f"not {method}")
    if method in METHOD_BITS and cfg.bits not in METHOD_BITS[method]:
        raise SlimtuneError(f"quantize: bits {cfg.bits} not supported by method {method} "
                            f"(supported: {', '.join(map(str, METHOD_BITS[method]))})")
    if method not in METHOD_BITS and "bits" in explicit:
        where = {"fixed_point": "int_bits / frac_bits", "mixed": "mixed.bits"}.get(method, "the method")
        raise SlimtuneError(f"quantize: bits does not apply to method {method} (its widths come from {where})")
    if method == "mixed":
        bad = [b for b in cfg.mixed.bits if b not in MIXED_BITS]
        if bad:
            raise SlimtuneError(f"quantize: mixed.bits {bad} not supported (candidates: "
                                f"{', '.join(map(str, MIXED_BITS))})")
        if cfg.mixed.budget_bits < min(cfg.mixed.bits):
            raise SlimtuneError(f"quantize: mixed.budget_bits {cfg.mixed.budget_bits} is below the narrowest "
                                f"candidate ({min(cfg.mixed.bits)} bits)")
    if method == "fixed_point" and 1 + cfg.int_bits + cfg.frac_bits > 16:
        raise SlimtuneError(f"quantize: fixed point Q{cfg.int_bits}.{cfg.frac_bits} needs "
                            f"{1 + cfg.int_bits + cfg.frac_bits} bits with the sign; at most 16 are supported")
    if method in NO_GROUPS and cfg.group_size is not None:
        raise SlimtuneError(f"quantize: group_size does not apply to method {method}")
    if cfg.algorithm != "rtn" and method != "weight_only":
        raise SlimtuneError(f"quantize: algorithm {cfg.algorithm} applies to method weight_only, not {method}")


def quantize_targets(model: nn.Module, cfg: QuantizeStage) -> dict[str, nn.Linear]:
    """The Linears the stage quantizes (default: every Linear of the layer stack), with group_size
    checked against each one's input width."""
    try:
        targets = select_linears(model, cfg.targets, cfg.ignore)
    except SlimtuneError as e:
        raise SlimtuneError(f"quantize: {str(e).replace(' to prune', ' to quantize')}") from None
    if cfg.group_size is not None:
        for name, linear in targets.items():
            if linear.in_features % cfg.group_size:
                raise SlimtuneError(f"quantize: group_size {cfg.group_size} does not divide the "
                                    f"{linear.in_features} input features of {name}")
    return targets


def validate_quantize(run: RunState, cfg: QuantizeStage) -> None:
    """Before OUT exists: the config, and the targets / group size against the model as loaded."""
    check_config(cfg)
    quantize_targets(run.model, cfg)


# ------------------------------------------------------------------------------------------- stage
def calibration_batches(run: RunState, cfg: QuantizeStage) -> list[dict]:
    if len(run.data.train) == 0:
        raise SlimtuneError("quantize: the calibration set is empty (the train split has no rows)")
    return prune_calibration(run, cfg)


def _merge_lora(run: RunState) -> bool:
    from slimtune.adapt.lora import is_peft, merge_lora

    if not is_peft(run.model):
        return False
    run.model = merge_lora(run.model)
    return True


def word_embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    if not isinstance(emb, nn.Embedding) or not name:
        raise SlimtuneError(f"quantize: embeddings: {type(model).__name__} has no nn.Embedding word embedding "
                            f"(set embeddings: false)")
    return name


def embedding_names(model: nn.Module) -> list[str]:
    """Every embedding table next to the word embedding (positions, token types too): ONNX Runtime
    quantizes each of their Gathers, so the torch simulation does the same."""
    word = word_embedding_name(model)
    parent = word.rsplit(".", 1)[0] + "." if "." in word else ""
    return [word] + [n for n, m in model.named_modules()
                     if isinstance(m, nn.Embedding) and n != word and n.startswith(parent)]


def _pooler(model: nn.Module, cfg: QuantizeStage) -> list[str]:
    """The pooler's Linear, stored int8 but computed in float: ONNX Runtime's int8 quantizers leave its
    Gemm float (dynamic) or would quantize its input (static), so only a weight-only pooler keeps the
    torch simulation and the deployed graph identical; its codes still shrink the packed file."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("pooler.dense")
            and not any(p in n for p in cfg.ignore or ())]


def _weight_spec(cfg: QuantizeStage, bits: int | None = None) -> dict:
    scheme = "symmetric" if cfg.symmetric else "asymmetric"
    if cfg.method == "fixed_point":
        return layer_spec(scheme="fixed_point", bits=1 + cfg.int_bits + cfg.frac_bits, int_bits=cfg.int_bits,
                          frac_bits=cfg.frac_bits)
    activations = {"dynamic_int8": "dynamic", "static_int8": "static"}.get(cfg.method)
    return layer_spec(bits=bits or cfg.bits, scheme=scheme, group_size=cfg.group_size, activations=activations,
                      per_tensor=activations is not None and cfg.weight_scales == "per_tensor")


def _saturation(targets: dict[str, nn.Linear], cfg: QuantizeStage) -> dict[str, float]:
    """fixed_point: share of each layer's weights outside the Qm.n range (they saturate)."""
    limit = 2 ** (cfg.int_bits + cfg.frac_bits)
    codes = {name: torch.round(lin.weight.detach().float() * 2.0 ** cfg.frac_bits) for name, lin in targets.items()}
    return {name: float(((c < -limit) | (c > limit - 1)).float().mean()) for name, c in codes.items()}


def _remember_spec(run: RunState) -> None:
    run.runner_state["quantize_spec"] = getattr(run.model.config, CONFIG_KEY, None)


def run_quantize(run: RunState, cfg: QuantizeStage) -> dict:
    check_config(cfg)
    merged = _merge_lora(run)
    if cfg.method in QAT_METHODS:
        from slimtune.quantize.qat import run_qat

        metrics = run_qat(run, cfg)
        _remember_spec(run)
        return metrics | ({"lora_merged": True} if merged else {})
    seed_everything(cfg.seed)
    model = run.model
    targets = quantize_targets(model, cfg)
    batches = calibration_batches(run, cfg)
    start_accuracy, size_before = run.eval_accuracy(model), quantized_size_bytes(model)
    extra: dict = {}
    if cfg.method == "mixed":
        from slimtune.quantize.mixed import average_bits, choose_bits

        mc = cfg.mixed
        eval_fn = default_eval_fn(run.data.eval, run.pad_id) if mc.sensitivity == "accuracy" else None
        bits, sensitivity = choose_bits(model, mc.bits, mc.budget_bits, mc.sensitivity, batches, eval_fn,
                                        targets=targets, group_size=cfg.group_size, symmetric=cfg.symmetric)
        specs = {name: _weight_spec(cfg, bits[name]) for name in targets}
        extra = {"bits_per_layer": bits, "sensitivity": {"measure": mc.sensitivity, "bits": min(mc.bits),
                                                         "per_layer": sensitivity},
                 "average_bits": round(average_bits(bits, targets), 4), "budget_bits": mc.budget_bits}
    elif cfg.method in INT8_ACTIVATIONS and cfg.weight_scales == "auto":
        from slimtune.quantize.granularity import choose_weight_scales

        chosen = choose_weight_scales(model, targets, batches[0], cfg.per_channel_ratio,
                                      "symmetric" if cfg.symmetric else "asymmetric")
        specs = {name: _weight_spec(cfg) | ({"per_tensor": True} if c["per_tensor"] else {})
                 | ({"scale_group": c["scale_group"]} if c["scale_group"] else {}) for name, c in chosen.items()}
        extra["weight_scales"] = {name: ("per_tensor" if c["per_tensor"] else "per_channel")
                                  + (f", shared with {c['scale_group']}" if c["scale_group"] else "")
                                  + f" (per-tensor error x{c['error_ratio']})" for name, c in chosen.items()}
    else:
        specs = {name: _weight_spec(cfg) for name in targets}
    if cfg.method == "fixed_point":
        extra["saturated"] = _saturation(targets, cfg)
    if cfg.embeddings:
        specs |= {name: EMBEDDING_SPEC for name in embedding_names(model)}
        if cfg.method in ("dynamic_int8", "static_int8") and cfg.targets is None:
            specs |= {name: _weight_spec(cfg) | {"activations": None} for name in _pooler(model, cfg)}
    algorithm = cfg.algorithm if cfg.method == "weight_only" else "rtn"
    report = quantize_(model, specs, batches, algorithm=algorithm, method=cfg.method)
    if cfg.method == "static_int8":
        # ranges observed with the int8 weights (and embeddings) in place and float activations: the
        # graph ONNX Runtime calibrates is the exported, dequantized one, i.e. exactly this model
        extra["activation_ranges"] = calibrate_activations_(model, batches)
    if cfg.method == "fixed_point":
        for name, share in extra.pop("saturated").items():
            report[name]["saturated"] = share
    _remember_spec(run)
    size_after = quantized_size_bytes(model)
    return {"stage": "quantize", "method": cfg.method, "algorithm": algorithm, "lora_merged": merged,
            "start_accuracy": start_accuracy, "accuracy": run.eval_accuracy(model), "quantized_layers": len(specs),
            "size_bytes_before": size_before, "size_bytes_quantized": size_after,
            "compression": round(size_before / size_after, 3),
            "calibration": {"split": "train", "batches": len(batches), "batch_size": cfg.calibration_batch_size,
                            "examples": sum(len(b["input_ids"]) for b in batches)},
            "layers": report, **extra}


def rebuild_quantize(run: RunState, cfg: QuantizeStage) -> None:
    """On --resume past a finished quantize stage: the quantized modules (empty), so the checkpoint fits."""
    _merge_lora(run)
    spec = run.runner_state.get("quantize_spec")
    if spec and "layers" not in spec:  # older runs kept one spec per stage index: the union of them
        spec = {"layers": {k: v for s in spec.values() if s for k, v in s["layers"].items()}}
    if spec:
        apply_quantization_skeleton_(run.model, spec)
