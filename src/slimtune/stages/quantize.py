"""`stage: quantize` — post-training quantization of the encoder's Linear weights (and, with
`embeddings: true`, the embedding tables as int8 with one scale per table), or quantization-aware
training. Each method has its own config (`method:` picks it) that accepts only its own keys:

  dynamic_int8  int8 weights (scales per channel, per tensor or auto), int8 activations quantized per
                call from their own range (ONNX Runtime's dynamic quantization, simulated exactly)
  static_int8   int8 weights, activation ranges calibrated once on train batches (ORT's MinMax)
  weight_only   int8 / int4 weights, per channel or per group; rtn, gptq or awq
  fixed_point   Qm.n weights (sign + m integer + n fraction bits), saturating; per-layer error reported
  mixed         per-layer widths from a sensitivity analysis under a size budget, then RTN
  binary / ternary / qat  trained with fake quantization (slimtune.stages.quantize_training)

The quantized model saves with save_pretrained and `slimtune.load_model` rebuilds it (the saved
form is described in `slimtune.quantize.core`). A LoRA adapter is merged first. On --resume past a finished
quantize stage, the quantized modules are rebuilt from the spec kept in the stage's state.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimtune.adapt.lora import is_peft, merge_lora
from slimtune.batching import calibration_batches
from slimtune.config import LoopConfig, Strict, tagged_union
from slimtune.errors import SlimtuneError
from slimtune.quantize.core import (
    CONFIG_KEY,
    apply_quantization_skeleton_,
    calibrate_activations_,
    layer_spec,
    quantize_,
    quantized_size_bytes,
)
from slimtune.quantize.granularity import choose_weight_scales
from slimtune.quantize.mixed import average_bits, choose_bits
from slimtune.quantize.targets import (
    EMBEDDING_SPEC,
    embedding_names,
    output_head_name,
    quantize_targets,
    untie_embeddings_,
)
from slimtune.stages.base import Run
from slimtune.stages.quantize_training import run_quantization_aware
from slimtune.train import seed_everything

MIXED_BITS = (2, 3, 4, 8)


# ------------------------------------------------------------------------------------------ configs
class _Quantize(Strict):
    """Keys every quantize method has."""

    stage: Literal["quantize"]
    targets: list[str] | None = Field(None, description="module-name patterns (default: every encoder Linear)")
    ignore: list[str] | None = Field(None, description="module-name patterns left in full precision")
    embeddings: bool = Field(True, description="also store the embedding tables as int8")
    calibration_batches: int = Field(8, ge=1, description="train batches for activation ranges / GPTQ / AWQ")
    calibration_batch_size: int = Field(16, ge=1)
    seed: int = 42


class Int8Quantize(_Quantize):
    """dynamic_int8 / static_int8: deployed as ONNX Runtime integer matmuls."""

    method: Literal["dynamic_int8", "static_int8"] = "dynamic_int8"
    symmetric: bool = Field(True, description="symmetric (zero point 0) or asymmetric weights")
    weight_scales: Literal["per_channel", "per_tensor", "auto"] = Field(
        "auto", description="one weight scale per output channel, one per matrix (ONNX Runtime's quantize_dynamic "
                            "default; faster at batch 1), or auto: per channel only where a layer needs it (see "
                            "per_channel_ratio), one scale shared by layers reading the same input elsewhere")
    per_channel_ratio: float = Field(10.0, gt=1, description="weight_scales auto: per channel when one scale per "
                                                            "matrix gives this many times the weight error")


class WeightOnlyQuantize(_Quantize):
    method: Literal["weight_only"]
    bits: Literal[8, 4] = 8
    group_size: int | None = Field(None, ge=1, description="weights per scale along the input dim (None: per "
                                                             "output channel)")
    symmetric: bool = True
    zero_point: Literal["integer", "float"] = Field(
        "integer", description="asymmetric codes: an int8 zero point over a range that holds 0, or a float one over "
                               "each group's own [min, max] (llama.cpp Q4_1's scale + min grid; torch's int4 "
                               "kernel's own layout)")
    algorithm: Literal["rtn", "gptq", "awq"] = Field(
        "rtn", description="round-to-nearest, GPTQ error compensation or AWQ activation-aware scaling")
    head: bool = Field(False, description="also quantize the output head (a causal LM's lm_head: a fifth of "
                                          "SmolLM2's weights, read at every decoded token); a head tied to the "
                                          "input embedding is untied first")
    head_bits: Literal[8, 4] | None = Field(None, description="head: its width (default: bits); 8 keeps the most "
                                                              "sensitive layer of a small LM at one scale per row")
    kernel: Literal["packed", "float"] = Field(
        "packed", description="packed: layers whose codes fit torch's packed int8 (one scale per row) or int4 "
                              "(groups of 32-256) kernels multiply from them with bf16 activations (faster than "
                              "fp32 at small batches, decode above all); float: dequantize and run the float matmul")

    @model_validator(mode="after")
    def _head(self):
        if self.head_bits is not None and not self.head:
            raise ValueError("head_bits applies to the head: set head: true")
        if self.zero_point == "float" and self.symmetric:
            raise ValueError("zero_point: float applies to asymmetric codes: set symmetric: false")
        return self


class FixedPointQuantize(_Quantize):
    method: Literal["fixed_point"]
    int_bits: int = Field(1, ge=0, le=15, description="integer bits m of Qm.n (sign bit extra)")
    frac_bits: int = Field(6, ge=0, le=30, description="fraction bits n of Qm.n")

    @model_validator(mode="after")
    def _width(self):
        if 1 + self.int_bits + self.frac_bits > 16:
            raise ValueError(f"fixed point Q{self.int_bits}.{self.frac_bits} needs {1 + self.int_bits + self.frac_bits}"
                             " bits with the sign; at most 16 are supported")
        return self


class MixedPrecision(Strict):
    """Per-layer bit widths from a sensitivity analysis, under a size budget."""

    bits: list[int] = Field([8, 4], min_length=1, description="candidate weight bit widths per layer")
    budget_bits: float = Field(6.0, gt=0, description="average bits per quantized weight allowed")
    sensitivity: Literal["accuracy", "output_error"] = Field(
        "output_error", description="rank layers by the dev metric's drop, or by logit error on calibration data, "
                                    "when only that layer is quantized to the lowest candidate")

    @field_validator("bits")
    @classmethod
    def _supported(cls, bits):
        bad = [b for b in bits if b not in MIXED_BITS]
        if bad:
            raise ValueError(f"bits {bad} not supported (candidates: {', '.join(map(str, MIXED_BITS))})")
        return bits

    @model_validator(mode="after")
    def _budget(self):
        if self.budget_bits < min(self.bits):
            raise ValueError(f"budget_bits {self.budget_bits} is below the narrowest candidate ({min(self.bits)} bits)")
        return self


class MixedQuantize(_Quantize):
    method: Literal["mixed"]
    mixed: MixedPrecision = MixedPrecision()
    group_size: int | None = Field(None, ge=1)
    symmetric: bool = True


class QATTraining(LoopConfig):
    """Training with quantized weights in the forward pass (straight-through estimator), on the one loop;
    optionally distilled from the full-precision model the stage started with."""

    epochs: float = Field(1, gt=0)
    # int8/int4 codes change with every rounding step (~scale/2): the usual fine-tuning magnitude
    lr: float | Literal["auto"] = 1e-4
    distill_from_full: bool = True
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the full-precision model's soft targets")


class LowBitTraining(QATTraining):
    # An Adam step moves a latent weight by about lr, and a binary/ternary forward only changes when a
    # weight crosses zero (or the ternary threshold 0.7 mean|w|, ~0.03 in a BERT layer): at 1e-4 most
    # codes would not move within one epoch, so binary/ternary get 5x more.
    lr: float | Literal["auto"] = 5e-4


class QATQuantize(_Quantize):
    method: Literal["qat"]
    bits: Literal[8, 4] = 8
    group_size: int | None = Field(None, ge=1)
    symmetric: bool = True
    train: QATTraining = QATTraining()


class LowBitQuantize(_Quantize):
    """binary: weights in {-a, +a} per output channel; ternary: {-a, 0, +a}."""

    method: Literal["binary", "ternary"]
    train: LowBitTraining = LowBitTraining()


# method -> config (a new method: its config class and a line here, its handling below or in its own file)
QUANTIZE_METHODS = {"dynamic_int8": Int8Quantize, "static_int8": Int8Quantize, "weight_only": WeightOnlyQuantize,
                    "fixed_point": FixedPointQuantize, "mixed": MixedQuantize, "qat": QATQuantize,
                    "binary": LowBitQuantize, "ternary": LowBitQuantize}
QuantizeConfig = tagged_union(QUANTIZE_METHODS, "method", default="dynamic_int8")
TRAINED = (QATQuantize, LowBitQuantize)


@dataclass
class QuantizeState:
    """What `rebuild` needs: the quantized-layer spec the stage wrote into the model's config."""

    spec: dict | None = None


# ------------------------------------------------------------------------------------------- stage
def _weight_spec(cfg, bits: int | None = None) -> dict:
    if isinstance(cfg, FixedPointQuantize):
        return layer_spec(scheme="fixed_point", bits=1 + cfg.int_bits + cfg.frac_bits, int_bits=cfg.int_bits,
                          frac_bits=cfg.frac_bits)
    scheme = "symmetric" if cfg.symmetric else "asymmetric"
    if getattr(cfg, "zero_point", "integer") == "float":
        scheme = "asymmetric_float"
    activations = {"dynamic_int8": "dynamic", "static_int8": "static"}.get(cfg.method)
    return layer_spec(bits=bits or getattr(cfg, "bits", 8), scheme=scheme, group_size=getattr(cfg, "group_size", None),
                      activations=activations,
                      per_tensor=activations is not None and cfg.weight_scales == "per_tensor",
                      kernel=getattr(cfg, "kernel", None))


def _pooler(model: nn.Module, cfg) -> list[str]:
    """The pooler's Linear, stored int8 but computed in float: ONNX Runtime's int8 quantizers leave its
    Gemm float (dynamic) or would quantize its input (static), so only a weight-only pooler keeps the
    torch simulation and the deployed graph identical; its codes still shrink the packed file."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("pooler.dense")
            and not any(p in n for p in cfg.ignore or ())]


def _saturation(targets: dict[str, nn.Linear], cfg: FixedPointQuantize) -> dict[str, float]:
    """fixed_point: share of each layer's weights outside the Qm.n range (they saturate)."""
    limit = 2 ** (cfg.int_bits + cfg.frac_bits)
    codes = {name: torch.round(lin.weight.detach().float() * 2.0 ** cfg.frac_bits) for name, lin in targets.items()}
    return {name: float(((c < -limit) | (c > limit - 1)).float().mean()) for name, c in codes.items()}


def quantize_calibration(run: Run, cfg) -> list[dict]:
    """The train batches a quantize method calibrates on (static int8 export calibrates on the same)."""
    if len(run.data.train) == 0:
        raise SlimtuneError("quantize: the calibration set is empty (the train split has no rows)")
    return calibration_batches(run.data.train, cfg.calibration_batches, cfg.calibration_batch_size, cfg.seed,
                               run.pad_id, collate_fn=run.task.collate, device=run.device)


class Quantize:
    name: ClassVar[str] = "quantize"
    Config: ClassVar[object] = QuantizeConfig
    methods: ClassVar[dict] = QUANTIZE_METHODS

    def __init__(self, config):
        self.config = config

    def validate(self, run: Run) -> None:
        """Before OUT exists: the targets and group size against the model as loaded."""
        group_size = getattr(self.config, "group_size", None)
        quantize_targets(run.model, self.config.targets, self.config.ignore, group_size)
        if getattr(self.config, "head", False):
            quantize_targets(run.model, [output_head_name(run.model)], None, group_size)

    def rebuild(self, run: Run) -> None:
        """On --resume past a finished quantize stage: the quantized modules (empty), so the checkpoint fits."""
        self._merge_lora(run)
        state = run.load_state(QuantizeState)
        if state is not None and state.spec:
            apply_quantization_skeleton_(run.model, state.spec)

    def calibration(self, run: Run) -> list[dict]:
        return quantize_calibration(run, self.config)

    @staticmethod
    def _merge_lora(run: Run) -> bool:
        if not is_peft(run.model):
            return False
        run.model = merge_lora(run.model)
        return True

    def run(self, run: Run) -> dict:
        cfg = self.config
        merged = self._merge_lora(run)
        if isinstance(cfg, TRAINED):
            metrics = run_quantization_aware(run, cfg)
        else:
            metrics = self._post_training(run)
        run.save_state(QuantizeState(spec=copy.deepcopy(getattr(run.model.config, CONFIG_KEY, None))))
        return metrics | {"lora_merged": merged}

    def _post_training(self, run: Run) -> dict:
        cfg, primary = self.config, run.task.primary.name
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        model = run.model
        targets = quantize_targets(model, cfg.targets, cfg.ignore, getattr(cfg, "group_size", None))
        batches = self.calibration(run)
        start_metric, size_before = run.primary_metric(model), quantized_size_bytes(model)
        extra: dict = {}
        if isinstance(cfg, MixedQuantize):
            mc = cfg.mixed
            eval_fn = run.eval_fn() if mc.sensitivity == "accuracy" else None
            bits, sensitivity = choose_bits(model, mc.bits, mc.budget_bits, mc.sensitivity, batches, eval_fn,
                                            targets=targets, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                            metric=run.task.primary.name,
                                            higher_is_better=run.task.primary.higher_is_better)
            specs = {name: _weight_spec(cfg, bits[name]) for name in targets}
            extra = {"bits_per_layer": bits, "sensitivity": {"measure": mc.sensitivity, "bits": min(mc.bits),
                                                             "per_layer": sensitivity},
                     "average_bits": round(average_bits(bits, targets), 4), "budget_bits": mc.budget_bits}
        elif isinstance(cfg, Int8Quantize) and cfg.weight_scales == "auto":
            chosen = choose_weight_scales(model, targets, batches[0], cfg.per_channel_ratio,
                                          "symmetric" if cfg.symmetric else "asymmetric")
            specs = {name: _weight_spec(cfg) | ({"per_tensor": True} if c["per_tensor"] else {})
                     | ({"scale_group": c["scale_group"]} if c["scale_group"] else {}) for name, c in chosen.items()}
            extra["weight_scales"] = {name: ("per_tensor" if c["per_tensor"] else "per_channel")
                                      + (f", shared with {c['scale_group']}" if c["scale_group"] else "")
                                      + f" (per-tensor error x{c['error_ratio']})" for name, c in chosen.items()}
        else:
            specs = {name: _weight_spec(cfg) for name in targets}
        saturated = _saturation(targets, cfg) if isinstance(cfg, FixedPointQuantize) else {}
        head = getattr(cfg, "head", False)
        if head:
            head_name = output_head_name(model)
            quantize_targets(model, [head_name], None, getattr(cfg, "group_size", None))  # its width checked
            head_bits = getattr(cfg, "head_bits", None) or cfg.bits
            # int8 heads take one scale per row (the packed int8 kernel's layout); int4 ones the groups
            specs[head_name] = _weight_spec(cfg, head_bits) | ({"group_size": None} if head_bits == 8 else {})
        if (head or cfg.embeddings) and untie_embeddings_(model):
            extra["untied_embeddings"] = True  # quantized apart, so the head no longer reads the input table
        if cfg.embeddings:
            specs |= {name: EMBEDDING_SPEC for name in embedding_names(model)}
            if isinstance(cfg, Int8Quantize) and cfg.targets is None:
                specs |= {name: _weight_spec(cfg) | {"activations": None} for name in _pooler(model, cfg)}
        algorithm = cfg.algorithm if isinstance(cfg, WeightOnlyQuantize) else "rtn"
        report = quantize_(model, specs, batches, algorithm=algorithm, method=cfg.method)
        if cfg.method == "static_int8":
            # ranges observed with the int8 weights (and embeddings) in place and float activations: the
            # graph ONNX Runtime calibrates is the exported, dequantized one, i.e. exactly this model
            extra["activation_ranges"] = calibrate_activations_(model, batches)
            # the deployed int8 graph calibrates on the very same train batches: the model says which
            getattr(model.config, CONFIG_KEY)["calibration"] = {
                "batches": cfg.calibration_batches, "batch_size": cfg.calibration_batch_size, "seed": cfg.seed}
        for name, share in saturated.items():
            report[name]["saturated"] = share
        size_after = quantized_size_bytes(model)
        return {"stage": "quantize", "method": cfg.method, "algorithm": algorithm,
                f"start_{primary}": start_metric, primary: run.primary_metric(model), "quantized_layers": len(specs),
                "size_bytes_before": size_before, "size_bytes_quantized": size_after,
                "compression": round(size_before / size_after, 3),
                "seconds": round(time.perf_counter() - t0, 1),  # calibration and quantization
                "calibration": {"split": "train", "batches": len(batches), "batch_size": cfg.calibration_batch_size,
                                "examples": sum(len(b["input_ids"]) for b in batches)},
                "layers": report, **extra}
