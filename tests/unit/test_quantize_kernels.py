"""Packed int8 / int4 weight kernels: the same codes as the float path, a bf16-activation matmul."""

import pytest
import torch
from torch import nn

from slimtune.quantize.core import QuantizedLinear, dequantize_, layer_spec, quantize_
from slimtune.quantize.kernels import kernel_of, use_packed


class Two(nn.Module):
    def __init__(self, d_in=64, d_hidden=128):
        super().__init__()
        self.up, self.down = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_in, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def quantized(spec: dict, algorithm="rtn", calibration=None) -> nn.Module:
    torch.manual_seed(0)
    model = Two()
    quantize_(model, {"up": spec, "down": spec}, calibration, algorithm=algorithm)
    return model


def float_path_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.kernel_saved, m.kernel = m.kernel, "float"
    try:
        return model(x)
    finally:
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.kernel = m.kernel_saved


@pytest.mark.parametrize(("bits", "scheme", "group_size", "kernel"), [
    (8, "symmetric", None, "int8_pack"), (8, "asymmetric", None, "int8_pack"),
    (4, "symmetric", 32, "int4_pack"), (4, "asymmetric", 64, "int4_pack"), (4, "asymmetric_float", 32, "int4_pack"),
    (8, "asymmetric_float", None, "int8_pack")])
@pytest.mark.parametrize("rows", [1, 7])
def test_packed_kernels_compute_what_the_dequantized_codes_compute(bits, scheme, group_size, kernel, rows):
    model = quantized(layer_spec(bits=bits, scheme=scheme, group_size=group_size, kernel="packed"))
    assert model.up.kernel == kernel and model.down.kernel == kernel
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        packed, reference = model(x), float_path_output(model, x)
    # bf16 activations: a few parts in a thousand, far below int8/int4 rounding; a wrong layout is O(1)
    assert (packed - reference).norm() / reference.norm() < 1e-2
    assert packed.dtype == torch.float32 and packed.shape == reference.shape


def test_awq_input_scales_are_divided_out_before_the_kernel():
    torch.manual_seed(1)
    # calibration batches reach the model as keyword inputs: the toy model takes `input_ids` (floats here)
    calibration = [{"input_ids": torch.randn(16, 64) * torch.linspace(0.1, 5, 64)}]

    class Wrapped(Two):
        def forward(self, input_ids):
            return super().forward(input_ids)

    torch.manual_seed(0)
    model = Wrapped()
    quantize_(model, {"up": layer_spec(bits=4, group_size=32, kernel="packed")}, calibration, algorithm="awq")
    assert model.up.input_scale is not None and model.up.kernel == "int4_pack"
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (model(x) - float_path_output(model, x)).norm() / float_path_output(model, x).norm() < 1e-2


@pytest.mark.parametrize(("spec", "reason"), [
    (layer_spec(bits=8, group_size=32, kernel="packed"), "int8 in groups"),
    (layer_spec(bits=4, group_size=16, kernel="packed"), "int4 groups of 16"),
    (layer_spec(bits=8, activations="dynamic", kernel="packed"), "quantized activations"),
    (layer_spec(bits=8), "")])
def test_layouts_without_a_kernel_fall_back_to_the_float_matmul(spec, reason):
    model = quantized(spec)
    assert model.up.kernel == "float"
    if reason:
        assert reason in kernel_of(model.up)[1]


def test_no_kernel_under_autograd_or_tracing():
    model = quantized(layer_spec(bits=8, kernel="packed"))
    x = torch.randn(2, 64, requires_grad=True)
    assert not use_packed(model.up, x)  # gradients flow through the float matmul
    assert not use_packed(model.up, x.detach())  # ... to the bias too
    with torch.no_grad():
        assert use_packed(model.up, x)
    model.up.bias.requires_grad_(False)
    assert use_packed(model.up, x.detach())
    traced = torch.jit.trace(model.eval(), torch.randn(2, 64))  # a traced graph holds the float matmul
    assert "int8pack" not in str(traced.graph)


def test_the_packed_copy_follows_new_codes():
    model = quantized(layer_spec(bits=8, kernel="packed"))
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model.up(x)
        model.up.qweight.mul_(-1)  # new codes: the packed copy must be rebuilt
        after = model.up(x)
    bias = model.up.bias.detach()
    assert torch.allclose(after - bias, -(before - bias), rtol=1e-2, atol=1e-2)


def test_dequantize_gives_back_plain_linears():
    model = quantized(layer_spec(bits=4, group_size=32, kernel="packed"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference = float_path_output(model, x)
        dequantize_(model)
        assert isinstance(model.up, nn.Linear)
        assert torch.allclose(model(x), reference, atol=1e-5)
