"""`stage: quantize` methods `binary`, `ternary` and `qat`: quantization-aware training.

The target Linears are swapped for `FakeQuantLinear`s: the float weight stays a trainable *latent*
weight, and every forward uses its quantized value (scales recomputed from the latent weight at every
step), with gradients passed straight through to the latent weight (Bengio et al. 2013). The stage
(`slimtune.stages.quantize_training`) trains on the one loop, by default distilled from the
full-precision model the stage started with. At the end `convert_qat_` hands the latent weights to
`quantize_`, which computes the same codes the forward used: the saved model follows the
quantized-model contract and gives the logits the trained fake-quant model gave.

  binary   weights in {-a, +a} per output channel, a = mean|w| (XNOR-Net's optimal scale)
  ternary  weights in {-a, 0, +a}, threshold 0.7 mean|w| (Ternary Weight Networks)
  qat      int8 / int4 weights (symmetric or asymmetric, per channel or per group)
With `embeddings: true` the word embeddings are trained fake-quantized too (int8, one scale for the table).

Resume: the FakeQuant modules keep the parameter names of the modules they replace, so a training
checkpoint taken mid-stage fits the prepared model and the loop resumes exactly. The stage-start
weights (the teacher, the post-training-quantization baseline) are kept in OUT/checkpoints/, since
after a kill the runner rebuilds earlier stages' structure but not their weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quantize.core import fake_quantize, layer_spec, quantize_
from slimtune.quantize.targets import EMBEDDING_SPEC

QAT_METHODS = ("binary", "ternary", "qat")
def weight_spec(method: str, bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> dict:
    """The contract's per-layer entry for the Linear weights one QAT method trains."""
    if method == "binary":
        bits, scheme = 1, "binary"
    elif method == "ternary":
        bits, scheme = 2, "ternary"
    elif method == "qat":
        if bits not in (4, 8):
            raise SlimtuneError(f"quantize: method qat takes bits 8 or 4 (got {bits})")
        scheme = "symmetric" if symmetric else "asymmetric"
    else:
        raise SlimtuneError(f"quantize: {method} is not a QAT method ({', '.join(QAT_METHODS)})")
    return layer_spec("linear", bits, scheme, group_size)


def straight_through(w: torch.Tensor, spec: dict) -> torch.Tensor:
    """The quantized value of `w` in the forward pass, an identity-like gradient in the backward pass.

    binary / ternary use the clipped STE of Hubara, Courbariaux et al. (Binarized Neural Networks, 2016):
    the gradient reaches a latent weight only while |w| <= 1, so a weight far outside the range the
    codes cover stops growing (BinaryConnect clips the latent weights to [-1, 1] for the same reason).
    We do not scale the gradient by a, as XNOR-Net's full derivative would: a is recomputed from the latent
    weights every step, and Adam normalises gradient size per weight anyway. For transformer weights
    (|w| ~ 0.05) the gate is open almost everywhere, i.e. this is the plain STE TWN trains with.
    int8/int4 use the plain STE: with min/max scales no weight is clamped, so no gate applies.
    """
    q = fake_quantize(w.detach(), spec["bits"], spec["scheme"], spec["group_size"],
                      per_tensor=spec.get("per_tensor", False))
    passed = q + (w - w.detach())  # value exactly q (w - w is exactly 0), gradient 1
    if spec["scheme"] in ("binary", "ternary"):
        return torch.where(w.detach().abs() <= 1, passed, q)
    return passed


class FakeQuantLinear(nn.Module):
    """A Linear whose forward uses its quantized weight. It holds the replaced Linear's own `weight` and
    `bias` parameters under the same names, so optimizer, checkpoints and state dicts see no change."""

    def __init__(self, linear: nn.Linear, spec: dict):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = dict(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, straight_through(self.weight, self.spec), self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}"


class FakeQuantEmbedding(nn.Module):
    """The word embedding looked up from its int8 value, trained through the STE; holds the
    replaced Embedding's `weight` under the same name."""

    OPTIONS = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

    def __init__(self, embedding: nn.Embedding, spec: dict):
        super().__init__()
        self.options = {k: getattr(embedding, k) for k in self.OPTIONS}
        self.weight = embedding.weight
        self.spec = dict(spec)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, straight_through(self.weight, self.spec), *self.options.values())

    def to_embedding(self) -> nn.Embedding:
        embedding = nn.Embedding(*self.weight.shape, **self.options, device="meta")
        embedding.weight = self.weight
        return embedding


def prepare_qat_(model: nn.Module, targets, spec: dict, embedding: str | None = None) -> None:
    """Swap the named Linears (and the word embedding `embedding`, if given) for fake-quant modules."""
    for name in targets:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise SlimtuneError(f"quantize: {name} is a {type(linear).__name__}, not an nn.Linear")
        model.set_submodule(name, FakeQuantLinear(linear, spec))
    if embedding is not None:
        model.set_submodule(embedding, FakeQuantEmbedding(model.get_submodule(embedding), EMBEDDING_SPEC))


def convert_qat_(model: nn.Module, method: str = "qat"):
    """Replace every fake-quant module by its real quantized module (same codes the forward used);
    records `method` in the model's `slimtune_quantization` config. Returns `quantize_`'s per-layer report
    ({name: {"bits", "scheme", "rel_error", "max_abs_error", ...}}: latent vs quantized weights)."""
    specs = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            model.set_submodule(name, module.to_linear())
        elif isinstance(module, FakeQuantEmbedding):
            model.set_submodule(name, module.to_embedding())
        else:
            continue
        specs[name] = dict(module.spec)
    if not specs:
        raise SlimtuneError("quantize: the model has no fake-quant module to convert (run prepare_qat_ first)")
    return quantize_(model, specs, algorithm="rtn", method=method)
