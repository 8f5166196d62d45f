"""SparseGPT: masks from OBS saliency, surviving weights updated to make up for the pruned ones."""

import pytest
import torch

from slimtune.prune.sparsegpt import sparsegpt_weight


def correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return base @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("sparsity, n_m", [(0.5, None), (None, (2, 4))])
def test_sparsegpt_reconstructs_the_outputs_better_than_masking_alone(sparsity, n_m):
    torch.manual_seed(1)
    x, w = correlated_inputs(), torch.randn(32, 64)
    h = x.T @ x
    pruned, keep = sparsegpt_weight(w, h, sparsity=sparsity, n_m=n_m, block_size=16)
    assert (pruned[~keep] == 0).all() and keep.float().mean() == pytest.approx(0.5, abs=1e-6)
    if n_m:
        assert bool((keep.reshape(32, -1, 4).sum(-1) == 2).all())
    # the same mask without the update, and Wanda's |w| * ||x|| mask: both lose more of the output
    masked_only = w * keep
    wanda_scores = w.abs() * x.norm(dim=0)
    wanda_keep = torch.zeros_like(keep)
    if n_m:
        groups = wanda_scores.reshape(32, -1, 4)
        wanda_keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
        wanda_keep = wanda_keep.reshape(32, 64)
    else:
        wanda_keep.scatter_(1, wanda_scores.topk(32, dim=1).indices, True)

    def error(v):
        return float(((x @ (w - v).T) ** 2).mean())

    assert error(pruned) < 0.7 * error(masked_only)
    assert error(pruned) < 0.7 * error(w * wanda_keep)


def test_dead_inputs_do_not_break_the_inverse():
    x = correlated_inputs()
    x[:, 5] = 0
    pruned, keep = sparsegpt_weight(torch.randn(8, 64), x.T @ x, sparsity=0.5)
    assert torch.isfinite(pruned).all() and keep.float().mean() == pytest.approx(0.5, abs=1e-6)


def test_sparsegpt_stage_on_a_classifier(tmp_path, tiny_model_dir, sst2_small):
    import slimtune

    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32},
              "stages": [{"stage": "finetune", "epochs": 1, "max_steps": 5, "lr": 1e-3, "batch_size": 16},
                         {"stage": "prune", "method": "sparsegpt", "n_m": [2, 4], "calibration": {"samples": 24}},
                         {"stage": "evaluate", "speed": False}]}
    metrics = slimtune.run(recipe, tmp_path / "out", progress=False)
    assert metrics["stages"][1]["final_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["final"]["accuracy"] is not None
