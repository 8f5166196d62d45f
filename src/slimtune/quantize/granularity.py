"""`weight_scales: auto` for int8: one weight scale per output channel only where a layer needs it.

Why: ONNX Runtime's int8 GEMM with a scale per output column costs ~8 us more per call than with one
scale (MLAS, one 20-token sentence, AVX-512 VNNI): 6-10% of MiniLM's batch-1 latency over its 36
matmuls. One scale per matrix is as accurate for most layers; BERT's FFN output layers are the
exception — a few output rows hold weights 20-40x larger than the rest (the "outlier dimensions"),
and one scale for the whole matrix then leaves the other rows a handful of codes (MiniLM: per-tensor
weight error up to 350x the per-channel one there, 2-8x elsewhere).

So: per channel where the per-tensor weight error is `ratio` times the per-channel one or more; one
scale elsewhere, and that scale shared by the layers that read the same input (query, key, value), so
the export runs them as one matmul (`slimtune.onnx_graph.fuse_shared_input_matmuls_`).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.batching import model_inputs
from slimtune.quantize.codes import fake_quantize


def per_tensor_error_ratio(weight: torch.Tensor, bits: int = 8, scheme: str = "symmetric") -> float:
    """Mean squared weight error with one scale per matrix over the error with one per output row."""
    w = weight.detach().float()
    per_row = (fake_quantize(w, bits, scheme) - w).pow(2).mean()
    per_tensor = (fake_quantize(w, bits, scheme, per_tensor=True) - w).pow(2).mean()
    return float(per_tensor / per_row.clamp(min=1e-30))


@torch.no_grad()
def shared_input_groups(model: nn.Module, linears: dict[str, nn.Linear], batch: dict) -> list[list[str]]:
    """Runs of consecutive calls of `linears` on the very same input tensor (one forward of `batch`):
    e.g. an attention block's query, key and value projections."""
    names = {id(m): n for n, m in linears.items()}
    calls: list[tuple[str, torch.Tensor]] = []

    def hook(module, args):
        calls.append((names[id(module)], args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in linears.values()]
    try:
        model.eval()(**model_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    groups, seen = [], set()
    for name, x in calls:
        if name in seen:  # a module called twice (weight sharing) never joins a group
            continue
        seen.add(name)
        if groups and groups[-1][1] is x:
            groups[-1][0].append(name)
        else:
            groups.append(([name], x))
    return [g for g, _ in groups if len(g) > 1]


def choose_weight_scales(model: nn.Module, linears: dict[str, nn.Linear], batch: dict, ratio: float,
                         scheme: str = "symmetric") -> dict[str, dict]:
    """{layer: {"per_tensor": bool, "scale_group": first member | None, "error_ratio": float}}."""
    chosen = {}
    for name, lin in linears.items():
        r = per_tensor_error_ratio(lin.weight, 8, scheme)
        chosen[name] = {"per_tensor": r < ratio, "scale_group": None, "error_ratio": round(r, 2)}
    for group in shared_input_groups(model, linears, batch):
        if all(chosen[n]["per_tensor"] for n in group):
            for n in group:
                chosen[n]["scale_group"] = group[0]
    return chosen
