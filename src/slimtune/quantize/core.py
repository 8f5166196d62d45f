"""Integer-code Linear / Embedding modules and the in-place verbs that make and undo them.

A quantized module keeps its weights as signed integer codes plus float scales (and zero points for
asymmetric schemes) and simulates its arithmetic in float: weight-only layers dequantize the codes and
run the float op. Dynamic / static int8 activations are quantized the way ONNX Runtime does (uint8
asymmetric per tensor, round half to even), and int8 x int8 layers then compute what ORT's integer
kernels compute, bit for bit (exact integer sums, then one scale multiply), so the in-process accuracy
is the deployed one up to the float noise of the ops around them (softmax, LayerNorm).

Saved form (what `slimtune.models.load_model` reads back): a replaced module at path P has
`P.qweight` (signed codes, int8; int16 for fixed point over 8 bits), `P.scale` float32 [rows, groups],
`P.zero_point` int8 (asymmetric only), `P.bias`, `P.input_scale` float32 [in] (AWQ only: the float
weight is (qweight - zero_point) * scale / input_scale) and `P.act_scale` / `P.act_zero_point` (static
activations only). config.json's `slimtune_quantization` = {"method", "layers": {P: spec}} with the
per-layer spec of `layer_spec`; `apply_quantization_skeleton_` rebuilds empty modules from it so the
weights load strictly.

Works on any `nn.Linear` (encoders and causal LMs alike). Weight algorithms: `rtn` (round to nearest,
per output channel or per group of `group_size` input weights; codes in `slimtune.quantize.codes`),
`gptq` and `awq` (calibrated, in `slimtune.quantize.calibration`). GPTQ and AWQ quantize block after
block of the layer stack: one calibration pass per block collects the inputs of its Linears, which
therefore come through the blocks already quantized (as in the GPTQ paper; inside a block the inputs
are those of the float block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quantize.blockwise import calibrate_blockwise_, layer_stack
from slimtune.quantize.calibration import (
    awq_codes,
    gptq_codes,
    input_stats,
    observe_input_ranges,
    output_mse,
    rtn_output_mse,
    sequential_groups,
)
from slimtune.quantize.codes import (
    SCALED_SCHEMES,
    activation_codes,
    activation_params,
    code_dtype,
    dequantize_codes,
    dynamic_activation_params,
    fake_quantize,
    fake_quantize_activations,
    pack_nibbles,
    quantize_codes,
    unpack_nibbles,
    zero_point_dtype,
)
from slimtune.quantize.kernels import kernel_of, packed_linear, use_packed

# names other modules import from here (the public surface of quantization)
__all__ = ["QUANTIZED", "QuantizedEmbedding", "QuantizedLinear", "apply_quantization_skeleton_",
           "calibrate_activations_", "check_spec", "dequantize_", "dequantize_codes", "fake_quantize",
           "layer_spec", "observe_input_ranges", "quantize_", "quantize_codes", "quantized_size_bytes"]

CONFIG_KEY = "slimtune_quantization"
SCHEMES = ("symmetric", "asymmetric", "asymmetric_float", "fixed_point", "binary", "ternary")
ALGORITHMS = ("rtn", "gptq", "awq")


# ------------------------------------------------------------------------------------------ specs
def layer_spec(kind: str = "linear", bits: int = 8, scheme: str = "symmetric", group_size: int | None = None,
               int_bits: int | None = None, frac_bits: int | None = None, activations: str | None = None,
               input_scale: bool = False, per_tensor: bool = False, scale_group: str | None = None,
               kernel: str | None = None) -> dict:
    """One layer's entry of the contract's `layers` mapping. `scale_group`: per-tensor layers naming the
    same group share one scale (that of their concatenated weights). `kernel: packed`: the layer runs on
    a packed int8/int4 kernel where its layout allows (`slimtune.quantize.kernels`); absent: float."""
    spec = {"kind": kind, "bits": bits, "scheme": scheme, "group_size": group_size, "int_bits": int_bits,
            "frac_bits": frac_bits, "activations": activations}
    return (spec | ({"input_scale": True} if input_scale else {}) | ({"per_tensor": True} if per_tensor else {})
            | ({"scale_group": scale_group} if scale_group else {}) | ({"kernel": kernel} if kernel else {}))


def check_spec(name: str, module: nn.Module, spec: dict) -> dict:
    """`spec` completed with defaults; SlimtuneError naming the module if it cannot apply to `module`."""
    unknown = set(spec) - set(layer_spec(input_scale=True, per_tensor=True, scale_group="g", kernel="packed"))
    if unknown:
        raise SlimtuneError(f"quantize: {name}: unknown spec keys {sorted(unknown)}")
    spec = layer_spec(**{k: v for k, v in spec.items() if v is not None or k == "group_size"})
    kind, bits, scheme, gs = spec["kind"], spec["bits"], spec["scheme"], spec["group_size"]
    expected = {"linear": nn.Linear, "embedding": nn.Embedding}.get(kind)
    if expected is None:
        raise SlimtuneError(f"quantize: {name}: unknown kind {kind!r} (linear or embedding)")
    if not isinstance(module, expected):
        raise SlimtuneError(f"quantize: {name} is a {type(module).__name__}, not an nn.{expected.__name__}; "
                            f"only nn.Linear and nn.Embedding modules can be quantized")
    if scheme not in SCHEMES:
        raise SlimtuneError(f"quantize: {name}: unknown scheme {scheme!r} ({', '.join(SCHEMES)})")
    if scheme == "fixed_point":
        if spec["int_bits"] is None or spec["frac_bits"] is None or min(spec["int_bits"], spec["frac_bits"]) < 0:
            raise SlimtuneError(f"quantize: {name}: fixed_point needs int_bits >= 0 and frac_bits >= 0")
        spec["bits"] = bits = 1 + spec["int_bits"] + spec["frac_bits"]
        if bits > 16:
            raise SlimtuneError(f"quantize: {name}: fixed point Q{spec['int_bits']}.{spec['frac_bits']} has "
                                f"{bits} bits with the sign; at most 16 are supported")
    elif scheme in ("binary", "ternary"):
        want = 1 if scheme == "binary" else 2
        if bits != want:
            raise SlimtuneError(f"quantize: {name}: {scheme} weights take bits {want} (got {bits})")
    elif not 2 <= bits <= 8:
        raise SlimtuneError(f"quantize: {name}: bits {bits} not supported for {scheme} weights (2 to 8)")
    cols = module.in_features if kind == "linear" else module.embedding_dim
    if gs is not None and (kind == "embedding" or scheme == "fixed_point"):
        raise SlimtuneError(f"quantize: {name}: group_size applies to Linear weights with scaled codes, "
                            f"not to {'embeddings' if kind == 'embedding' else 'fixed point'}")
    if gs is not None and (gs < 1 or cols % gs):
        raise SlimtuneError(f"quantize: {name}: group_size {gs} does not divide its {cols} input features")
    if spec.get("scale_group") and not spec.get("per_tensor"):
        raise SlimtuneError(f"quantize: {name}: scale_group needs per_tensor (one scale shared by the group)")
    if spec.get("kernel") not in (None, "packed", "float"):
        raise SlimtuneError(f"quantize: {name}: kernel {spec['kernel']!r} (packed or float)")
    if spec["activations"] not in (None, "dynamic", "static") or (spec["activations"] and kind == "embedding"):
        raise SlimtuneError(f"quantize: {name}: activations {spec['activations']!r} (null, dynamic or static; "
                            f"Linear layers only)")
    return spec


# ---------------------------------------------------------------------------------------- modules
def _register_codes(module: nn.Module, rows: int, cols: int, spec: dict) -> None:
    groups = cols // spec["group_size"] if spec["group_size"] else 1
    module.register_buffer("qweight", torch.zeros(rows, cols, dtype=code_dtype(spec["bits"])))
    module.register_buffer("scale", torch.ones(rows, groups))
    zero_dtype = zero_point_dtype(spec["scheme"])
    module.register_buffer("zero_point", None if zero_dtype is None else torch.zeros(rows, groups, dtype=zero_dtype))
    if spec["bits"] <= 4:  # two codes a byte in the saved weights (and checkpoints); one a byte in memory
        module.register_state_dict_post_hook(_nibbles_out)
        module.register_load_state_dict_pre_hook(_nibbles_in)


def _nibbles_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    key = prefix + "qweight"
    if key in state_dict:
        state_dict[key] = pack_nibbles(state_dict[key])


def _nibbles_in(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "qweight"
    saved = state_dict.get(key)
    if saved is not None and saved.dtype == torch.uint8:  # older directories saved one code a byte
        state_dict[key] = unpack_nibbles(saved, module.qweight.shape[1])


def _fill_codes(module: nn.Module, codes, scale, zero_point) -> None:
    if codes.shape != module.qweight.shape or scale.shape != module.scale.shape:
        raise ValueError(f"codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit "
                         f"{tuple(module.qweight.shape)} / {tuple(module.scale.shape)}")
    module.qweight.copy_(codes)
    module.scale.copy_(scale)
    if module.zero_point is not None:
        module.zero_point.copy_(zero_point)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W = (qweight - zero_point) * scale [/ input_scale per input column]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.scheme, self.group_size = spec["bits"], spec["scheme"], spec["group_size"]
        self.int_bits, self.frac_bits = spec.get("int_bits"), spec.get("frac_bits")
        self.activations = spec.get("activations")
        self.observing = False  # True while calibrate_activations_ records ranges: float inputs pass through
        _register_codes(self, out_features, in_features, spec)
        self.register_buffer("input_scale", torch.ones(in_features) if spec.get("input_scale") else None)
        self.kernel = kernel_of(self)[0] if spec.get("kernel") == "packed" else "float"
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        static = self.activations == "static"
        self.register_buffer("act_scale", torch.tensor(1.0) if static else None)
        self.register_buffer("act_zero_point", torch.tensor(0, dtype=torch.int32) if static else None)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict) -> QuantizedLinear:
        return cls(in_features, out_features, bias, spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None, spec: dict,
                    input_scale: torch.Tensor | None = None) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     spec | ({"input_scale": True} if input_scale is not None else {}))
        with torch.no_grad():
            _fill_codes(module, codes, scale, zero_point)
            if input_scale is not None:
                module.input_scale.copy_(input_scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        w = dequantize_codes(self.qweight, self.scale, self.zero_point)
        return w if self.input_scale is None else w / self.input_scale

    @property
    def weight(self) -> torch.Tensor:
        """Read-only float view, for code that inspects `.weight` (shape, dtype)."""
        return self.dequantized_weight()

    @property
    def integer_kernel(self) -> bool:
        """Whether ONNX Runtime runs this layer as an integer matmul (MatMulInteger or its fusions):
        int8 activations times symmetric int8 weight codes, one scale per row or per matrix."""
        return (self.activations is not None and self.scheme == "symmetric" and self.bits == 8
                and self.group_size is None and self.input_scale is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.activations == "dynamic":
            scale, zero_point = dynamic_activation_params(x)
        elif self.activations == "static" and not self.observing:
            scale, zero_point = self.act_scale, self.act_zero_point
        elif use_packed(self, x):
            return packed_linear(self, x)
        else:
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if self.integer_kernel and x.dtype == torch.float32:
            # ORT's arithmetic bit for bit: integer products summed exactly (float32 holds integers up
            # to 2^24, far above these sums), one multiply by s_x * s_w, then the bias. A float matmul
            # of dequantized values rounds differently, and downstream each tiny difference that lands
            # on an activation rounding boundary moves a code: a third more logit noise against ORT.
            acc = F.linear(activation_codes(x, scale, zero_point), self.qweight.to(x.dtype))
            y = acc * (scale * self.scale.view(-1))
            return y if bias is None else bias + y
        x = fake_quantize_activations(x, scale, zero_point)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"scheme={self.scheme}, group_size={self.group_size}, activations={self.activations}, "
                f"kernel={self.kernel}")


class QuantizedEmbedding(nn.Module):
    """Rows stored as codes with a scale per row (the same for every row with `per_tensor`); a lookup
    dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, spec: dict):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.bits, self.scheme, self.group_size = spec["bits"], spec["scheme"], None
        _register_codes(self, num_embeddings, embedding_dim, spec | {"group_size": None})

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
              spec: dict) -> QuantizedEmbedding:
        return cls(num_embeddings, embedding_dim, padding_idx, spec)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, codes: torch.Tensor, scale: torch.Tensor,
                       zero_point: torch.Tensor | None, spec: dict) -> QuantizedEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, spec)
        with torch.no_grad():
            _fill_codes(module, codes, scale, zero_point)
        return module.to(embedding.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_codes(self.qweight, self.scale, self.zero_point)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[input_ids].float()
        if self.zero_point is not None:
            rows = rows - self.zero_point[input_ids].float()
        return rows * self.scale[input_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, padding_idx={self.padding_idx}"


QUANTIZED = (QuantizedLinear, QuantizedEmbedding)


def _module_at(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SlimtuneError(f"quantize: module {name!r} does not exist in {type(model).__name__}") from None


def _float_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().float()


# ------------------------------------------------------------------------------- calibration data
# ------------------------------------------------------------------------------------------ verbs
def quantize_(model: nn.Module, targets: dict[str, dict], calibration: list[dict] | None = None,
              algorithm: str = "rtn", method: str | None = None) -> dict:
    """Replace each module named in `targets` by its quantized version (per its contract spec).

    `calibration` (model input batches) is needed by gptq / awq and, when given, adds each Linear's
    output MSE to the report. Records the specs in `model.config.slimtune_quantization` (merged with
    layers quantized earlier). Returns {name: {"bits", "rel_error", "max_abs_error", "output_mse", ...}}.
    """
    if algorithm not in ALGORITHMS:
        raise SlimtuneError(f"quantize: unknown algorithm {algorithm!r} ({', '.join(ALGORITHMS)})")
    if calibration is not None and len(calibration) == 0:
        raise SlimtuneError("quantize: the calibration set is empty")
    if algorithm != "rtn" and not calibration:
        raise SlimtuneError(f"quantize: algorithm {algorithm} needs calibration batches (none given)")
    if not targets:
        raise SlimtuneError("quantize: no module to quantize")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    specs = {}
    for name in sorted(targets, key=lambda n: order.get(n, -1)):  # execution order, for sequential GPTQ/AWQ
        module = _module_at(model, name)
        if isinstance(module, QUANTIZED):
            raise SlimtuneError(f"quantize: {name} is already quantized")
        specs[name] = check_spec(name, module, targets[name])
        if algorithm != "rtn" and specs[name]["kind"] == "linear" and \
                specs[name]["scheme"] not in SCALED_SCHEMES:
            raise SlimtuneError(f"quantize: {name}: {algorithm} works with symmetric/asymmetric codes, "
                                f"not {specs[name]['scheme']}")
    with torch.no_grad():
        if algorithm == "rtn":
            report = _quantize_rtn_(model, specs, calibration)
        else:
            report = _quantize_sequential_(model, specs, calibration, algorithm)
    for name in specs:
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):
            report[name]["kernel"] = module.kernel
    _record(model, specs, method)
    return report


def _error_report(w: torch.Tensor, wq: torch.Tensor, spec: dict) -> dict:
    diff = w - wq
    return {"kind": spec["kind"], "bits": spec["bits"], "scheme": spec["scheme"], "group_size": spec["group_size"],
            "rel_error": float(diff.norm() / w.norm().clamp(min=1e-12)), "max_abs_error": float(diff.abs().max())}


def _replace(model: nn.Module, name: str, module: nn.Module, spec: dict, codes, scale, zero, input_scale=None):
    if spec["kind"] == "embedding":
        new = QuantizedEmbedding.from_embedding(module, codes, scale, zero, spec)
    else:
        new = QuantizedLinear.from_linear(module, codes, scale, zero, spec, input_scale=input_scale)
    model.set_submodule(name, new)
    return new


def _codes_of(module: nn.Module, spec: dict):
    return _codes_of_weight(_float_weight(module), spec)


def _codes_of_weight(w: torch.Tensor, spec: dict):
    return quantize_codes(w, spec["bits"], spec["scheme"], spec["group_size"], spec["int_bits"], spec["frac_bits"],
                          spec.get("per_tensor", False))


def _shared_scale_codes(modules: dict, specs: dict, names: list[str]) -> dict:
    """Per-tensor codes of layers sharing one scale: those of their weights stacked as one matrix."""
    first = specs[names[0]]
    if any(specs[n]["kind"] != "linear" or {**specs[n], "scale_group": None} != {**first, "scale_group": None}
           for n in names):
        raise SlimtuneError(f"quantize: scale_group {first['scale_group']!r}: its layers {names} differ in spec")
    weights = [_float_weight(modules[n]) for n in names]
    if len({w.shape[1] for w in weights}) != 1:
        raise SlimtuneError(f"quantize: scale_group {first['scale_group']!r}: its layers {names} differ in "
                            f"input width")
    codes, scale, zero = _codes_of_weight(torch.cat(weights), first)
    out, row = {}, 0
    for n, w in zip(names, weights, strict=True):
        rows = slice(row, row + w.shape[0])
        out[n] = (codes[rows], scale[rows], None if zero is None else zero[rows])
        row += w.shape[0]
    return out


def _quantize_rtn_(model: nn.Module, specs: dict, calibration: list[dict] | None) -> dict:
    modules = {name: model.get_submodule(name) for name in specs}
    groups: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if spec.get("scale_group"):
            groups.setdefault(spec["scale_group"], []).append(name)
    quantized = {name: _codes_of(modules[name], spec) for name, spec in specs.items() if not spec.get("scale_group")}
    for names in groups.values():
        quantized |= _shared_scale_codes(modules, specs, names)
    report, diffs = {}, {}
    for name, (codes, scale, zero) in quantized.items():
        w = _float_weight(modules[name])
        wq = dequantize_codes(codes, scale, zero)
        report[name] = _error_report(w, wq, specs[name])
        if specs[name]["kind"] == "linear":
            diffs[modules[name]] = w - wq
    mse = rtn_output_mse(model, diffs, calibration) if calibration else {}
    for name, (codes, scale, zero) in quantized.items():
        if modules[name] in mse:
            report[name]["output_mse"] = mse[modules[name]]
        _replace(model, name, modules[name], specs[name], codes, scale, zero)
    return report


def _quantize_sequential_(model: nn.Module, specs: dict, calibration: list[dict], algorithm: str) -> dict:
    """Targets before the layer stack (embeddings), then the stack block by block on carried inputs
    (`slimtune.quantize.blockwise`), then those after it (a head), each calibrated on inputs that went
    through everything quantized before it."""
    report = {}

    def quantize_group(stats: dict[str, dict]) -> None:
        for name, st in stats.items():
            report[name] = _quantize_one_(model, name, specs[name], st, algorithm)

    def one_pass_per_group(names: list[str]) -> None:  # a whole-model calibration forward per group
        for group in sequential_groups(model, names):
            linears = {name: model.get_submodule(name) for name in group if specs[name]["kind"] == "linear"}
            stats = input_stats(model, linears, calibration) if linears else {}
            quantize_group({name: stats.get(name) for name in group})

    stack = layer_stack(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    before = [n for n in specs if stack is None or order[n] < order[stack[0]]]
    one_pass_per_group(before)
    in_stack = {n: model.get_submodule(n) for n in specs if n not in before and specs[n]["kind"] == "linear"}
    done = calibrate_blockwise_(model, in_stack, calibration, quantize_group)
    one_pass_per_group([n for n in specs if n not in before and n not in done])
    return report


def _quantize_one_(model: nn.Module, name: str, spec: dict, stats: dict | None, algorithm: str) -> dict:
    module = model.get_submodule(name)
    w = _float_weight(module)
    rtn = _codes_of(module, spec)
    if stats is None:  # an embedding: round to nearest
        _replace(model, name, module, spec, *rtn)
        return _error_report(w, dequantize_codes(*rtn), spec)
    input_scale, extra = None, {}
    if algorithm == "gptq":
        codes, scale, zero = gptq_codes(w, stats["hessian"], spec["bits"], spec["scheme"], spec["group_size"])
        wq = dequantize_codes(codes, scale, zero)
    else:
        codes, scale, zero, input_scale, alpha, _ = awq_codes(w, stats, spec["bits"], spec["scheme"],
                                                             spec["group_size"])
        wq = dequantize_codes(codes, scale, zero) / input_scale
        spec["input_scale"] = True
        extra = {"awq_exponent": alpha}
    _replace(model, name, module, spec, codes, scale, zero, input_scale)
    return _error_report(w, wq, spec) | {"output_mse": output_mse(w - wq, stats),
                                          "rtn_output_mse": output_mse(w - dequantize_codes(*rtn), stats)} | extra


def _record(model: nn.Module, specs: dict, method: str | None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    old = getattr(config, CONFIG_KEY, None) or {}
    setattr(config, CONFIG_KEY, {**old, "method": method or old.get("method") or "custom",  # old: calibration
                                 "layers": {**old.get("layers", {}), **specs}})


def apply_quantization_skeleton_(model: nn.Module, spec: dict) -> None:
    """Replace the modules a `slimtune_quantization` config lists by empty quantized modules of the
    right shapes and dtypes, so the saved state dict loads strictly. Already quantized ones are kept."""
    layers = spec.get("layers") if isinstance(spec, dict) else None
    if not isinstance(layers, dict):
        raise SlimtuneError(f"{CONFIG_KEY}: expected a mapping with 'layers', got {spec!r:.80}")
    for name, layer in layers.items():
        module = _module_at(model, name)
        if isinstance(module, QUANTIZED):
            continue
        layer = check_spec(name, module, layer)
        if layer["kind"] == "embedding":
            new = QuantizedEmbedding.empty(module.num_embeddings, module.embedding_dim, module.padding_idx, layer)
        else:
            new = QuantizedLinear.empty(module.in_features, module.out_features, module.bias is not None, layer)
        model.set_submodule(name, new.to(module.weight.device))
    if getattr(model, "config", None) is not None:
        _record(model, {k: dict(v) for k, v in layers.items()}, spec.get("method"))


def dequantize_(model: nn.Module) -> nn.Module:
    """Every quantized module -> a plain nn.Linear / nn.Embedding holding its dequantized weight
    (static/dynamic activation quantization is dropped: ONNX Runtime re-adds it). Removes the config key."""
    for name, module in list(model.named_modules()):
        with torch.no_grad():
            if isinstance(module, QuantizedLinear):
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                plain.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            elif isinstance(module, QuantizedEmbedding):
                plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                     _weight=module.dequantized_weight().clone())
            else:
                continue
        model.set_submodule(name, plain.to(module.qweight.device))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    return model


def calibrate_activations_(model: nn.Module, batches: list[dict],
                           ranges: dict[str, tuple[float, float]] | None = None) -> dict:
    """Static int8: act_scale / act_zero_point of every static QuantizedLinear from the per-tensor range
    of its input, widened to hold 0 (ORT's MinMax calibration). `ranges` observed on the float model
    before its weights were quantized (what ORT calibrates) are used when given; otherwise the ranges
    are observed now, with int8 weights and float activations. Returns {name: {min, max, scale, zero_point}}."""
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, QuantizedLinear) and m.activations == "static"}
    if not modules:
        raise SlimtuneError("quantize: no Linear with static activations to calibrate")
    if ranges is None:
        ranges = observe_input_ranges(model, modules, batches)
    report = {}
    for name, m in modules.items():
        if name not in ranges:
            raise SlimtuneError(f"quantize: no calibration range for {name}")
        lo, hi = ranges[name]
        scale, zero = activation_params(lo, hi)
        m.act_scale.fill_(scale)
        m.act_zero_point.fill_(zero)
        report[name] = {"min": lo, "max": hi, "scale": scale, "zero_point": zero}
    return report


def quantized_size_bytes(model: nn.Module) -> int:
    """Ideal storage: codes at their bit width (packed), everything else (scales, zero points, float
    parameters and buffers of the state dict) at its dtype's size. Shared tensors count once."""
    bits = {name: m.bits for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
    seen, total = set(), 0
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        owner, _, leaf = key.rpartition(".")
        if leaf == "qweight" and owner in bits:
            codes = t.numel() * (2 if t.dtype == torch.uint8 else 1)  # the state dict holds 4-bit codes two a byte
            total += math.ceil(codes * bits[owner] / 8)
        else:
            total += t.numel() * t.element_size()
    return total
