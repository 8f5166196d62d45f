"""Unstructured pruning on tiny random BERTs: exact sparsity, masks held through training, the cubic
schedule through train()'s on_step hook (and its resume), Wanda and 2:4, permanence, bad input."""

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from slimtune.batching import EncodedDataset, collate
from slimtune.checkpoint import CheckpointStore
from slimtune.config import LoopConfig
from slimtune.errors import SlimtuneError
from slimtune.prune.unstructured import (
    GradualPruner,
    collect_input_norms,
    cubic_sparsity,
    make_permanent_,
    mask_of,
    prune_activation_,
    prune_magnitude_,
    select_linears,
    sparsity_report,
)
from slimtune.train import LoopSettings, TrainContext, cross_entropy_loss, train

QUERY0 = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def random_ds(n, vocab=(1000, 5000), lengths=(3, 20), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(*vocab, (int(torch.randint(*lengths, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return EncodedDataset(ids, [int(x[0] % 2) for x in ids])


@pytest.fixture(scope="module")
def calib():
    ds = random_ds(16)
    return [collate(ds, list(range(i, i + 4))) for i in range(0, 16, 4)]


def exact(rep, linears, s):
    return all(rep.per_layer[n] == round(s * lin.weight.numel()) / lin.weight.numel() for n, lin in linears.items())


def test_default_targets_are_the_layer_linears_and_patterns_select(model):
    lins = select_linears(model)
    assert len(lins) == 12 and all(n.startswith("bert.encoder.layer.") for n in lins)  # no classifier, pooler
    assert list(select_linears(model, ["query"])) == [QUERY0, "bert.encoder.layer.1.attention.self.query"]
    assert list(select_linears(model, [r"re:.*layer\.0\..*self"], ignore=["key", "value"])) == [QUERY0]
    assert "classifier" in select_linears(model, ["Linear"])


def test_per_layer_sparsity_is_exact_and_independent_of_the_norm(base, model):
    rep = prune_magnitude_(model, sparsity=0.5)
    lins = select_linears(model)
    assert exact(rep, lins, 0.5)
    assert not (model.classifier.weight == 0).any()
    for norm in ("l2", "none"):
        other = copy.deepcopy(base)
        prune_magnitude_(other, sparsity=0.5, norm=norm)
        assert all(torch.equal(mask_of(lin), mask_of(lins[n])) for n, lin in select_linears(other).items())


def test_global_sparsity_is_exact_overall_and_normalised_norms_are_scale_free(model):
    with torch.no_grad():
        model.get_submodule(QUERY0).weight.mul_(10)
    raw, l1 = copy.deepcopy(model), copy.deepcopy(model)
    rep_raw = prune_magnitude_(raw, sparsity=0.5, scope="global", norm="none")
    rep_l1 = prune_magnitude_(l1, sparsity=0.5, scope="global", norm="l1")
    n = rep_raw.n_weights
    assert rep_raw.n_zeros == rep_l1.n_zeros == round(0.5 * n)
    assert rep_raw.per_layer[QUERY0] < 0.15  # raw magnitude spares the large-scale layer...
    assert abs(rep_l1.per_layer[QUERY0] - 0.5) < 0.1  # ...normalised by its L1 norm it is pruned like the rest


def test_threshold_zeroes_exactly_the_weights_below_it(model):
    before = {n: lin.weight.detach().clone() for n, lin in select_linears(model).items()}
    prune_magnitude_(model, threshold=0.02)
    for n, lin in select_linears(model).items():
        small = before[n].abs() < 0.02
        assert torch.equal(lin.weight == 0, small)
        assert torch.equal(lin.weight[~small], before[n][~small])


def test_masks_stay_applied_through_optimizer_steps(model, calib):
    prune_magnitude_(model, sparsity=0.6)
    lins = select_linears(model)
    masks = {n: mask_of(lin).clone() for n, lin in lins.items()}
    before = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "embeddings" not in n], lr=1e-2,
                            weight_decay=0.1)
    model.train()
    for batch in calib[:3]:
        cross_entropy_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for n, lin in lins.items():
        assert (lin.weight[~masks[n]] == 0).all()
        assert not torch.equal(lin.weight[masks[n]], before[n][masks[n]])  # the survivors did train


def test_cubic_schedule_start_middle_end_and_monotonic():
    s = [cubic_sparsity(t, 100, 0.8, every=1) for t in range(101)]
    assert s[0] == 0.0 and s[40] == pytest.approx(0.8 * (1 - 0.5 ** 3)) and s[80] == s[100] == 0.8
    assert all(b >= a for a, b in zip(s, s[1:], strict=False))
    late = [cubic_sparsity(t, 100, 0.8, initial_sparsity=0.1, start_frac=0.2, every=10) for t in range(101)]
    assert late[19] == 0.0 and late[20] == pytest.approx(0.1) and late[25] == late[20]  # events every 10 steps
    assert len(set(late)) == 1 + 6 + 1  # dense, 6 events in [20, 80), final
    assert all(b >= a for a, b in zip(late, late[1:], strict=False))


TINY = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=2)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(TINY)


def stage(**kw):
    """The settings of one loop run (lr 1e-3, batch 8, no keep_best), overridden by `kw`."""
    return LoopSettings.from_config(LoopConfig(**(dict(epochs=2, keep_best=False) | kw)), lr=1e-3, batch_size=8)


def test_gradual_pruner_runs_from_the_on_step_hook_once_per_optimizer_step():
    model = tiny_bert()
    pruner = GradualPruner(model, 0.75, total_steps=8, end_frac=0.75, every=2)
    calls, seen = [], []

    def on_step(step):
        calls.append(step)
        pruner.step(step)
        seen.append(sparsity_report(model, pruner.linears).overall)

    res = train(model, random_ds(64, vocab=(1, 100), lengths=(3, 10)), stage(grad_accum=2),
                TrainContext(progress=False), on_step=on_step)
    assert res.steps == 8 and calls == list(range(1, 9))  # 16 batches, 8 optimizer steps
    assert seen == sorted(seen) and seen[0] == 0 < seen[1] < seen[3] < seen[5]  # gradual, never regrown
    assert exact(sparsity_report(model, pruner.linears), pruner.linears, 0.75)


def test_gradual_pruning_resumes_to_identical_weights_and_masks(tmp_path):
    ds, cfg = random_ds(48, vocab=(1, 100), lengths=(3, 10)), stage(checkpoint_every=4, epochs=3)

    def run(model, store, resume=None, loss_fn=cross_entropy_loss):
        pruner = GradualPruner(model, 0.6, total_steps=18, every=3)  # before train(): its optimizer sees the masks
        train(model, ds, cfg, TrainContext(progress=False, checkpoints=store, resume=resume),
              loss_fn=loss_fn, on_step=pruner.step)

    ref = tiny_bert()
    run(ref, CheckpointStore(tmp_path / "a"))
    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # after the step-8 checkpoint; masks change again at steps 9, 12 and 14
            raise KeyboardInterrupt
        return cross_entropy_loss(model, batch)

    store = CheckpointStore(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_bert(), store, loss_fn=crashing_loss)
    resumed = tiny_bert(seed=99)
    run(resumed, store, resume=store.latest())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True))
    assert sparsity_report(ref).overall == pytest.approx(0.6, abs=1e-3)


def test_input_norms_ignore_padding(model):
    lins = select_linears(model)
    ds = random_ds(2, lengths=(4, 12), seed=3)
    assert len(ds.input_ids[0]) != len(ds.input_ids[1])
    together = collect_input_norms(model, lins, [collate(ds, [0, 1])])
    apart = collect_input_norms(model, lins, [collate(ds, [0]), collate(ds, [1])])
    for n in lins:
        torch.testing.assert_close(together[n], apart[n], rtol=1e-4, atol=1e-5)


def test_wanda_keeps_small_weights_on_a_high_norm_input_feature(model, calib):
    j = 5
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight[j] = 1e3  # feature j of layer 0's input becomes huge
        model.get_submodule(QUERY0).weight[:, j] = 1e-4  # while its weights in the query are tiny
    magnitude = copy.deepcopy(model)
    prune_magnitude_(magnitude, sparsity=0.5, targets=[QUERY0])
    assert (magnitude.get_submodule(QUERY0).weight[:, j] == 0).all()
    rep = prune_activation_(model, calib, sparsity=0.5, targets=[QUERY0])
    w = model.get_submodule(QUERY0).weight
    assert (w[:, j] != 0).all()
    assert ((w == 0).sum(1) == 16).all() and rep.overall == 0.5  # exactly half of every output row


def test_two_four_leaves_exactly_two_zeros_in_every_group_of_four(model, calib):
    rep = prune_activation_(model, calib, n_m=(2, 4))
    for lin in select_linears(model).values():
        assert ((lin.weight.reshape(lin.out_features, -1, 4) == 0).sum(-1) == 2).all()
    assert rep.overall == 0.5


def test_make_permanent_leaves_a_plain_hf_model(model, tmp_path):
    prune_magnitude_(model, sparsity=0.5)
    masked_copy = copy.deepcopy(model)
    rep = make_permanent_(model)
    assert mask_of(masked_copy.get_submodule(QUERY0)) is not None  # a deep copy keeps its masks working
    assert sparsity_report(masked_copy).n_zeros == rep.n_zeros
    assert rep.overall == pytest.approx(0.5, abs=1e-3) and len(rep.per_layer) == 12
    assert not any("parametrizations" in k or "orig" in k for k in model.state_dict())
    for m in model.modules():
        assert not parametrize.is_parametrized(m) and not m._forward_pre_hooks
    assert all(type(lin) is nn.Linear for lin in select_linears(model).values())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    batch = collate(random_ds(3), [0, 1, 2], with_labels=False)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert sparsity_report(loaded).n_zeros == rep.n_zeros


@pytest.mark.parametrize("call, message", [
    (lambda m, c: prune_magnitude_(m, sparsity=1.0), "sparsity 1.0 outside [0, 1)"),
    (lambda m, c: prune_magnitude_(m, sparsity=-0.1), "sparsity -0.1 outside [0, 1)"),
    (lambda m, c: prune_activation_(m, c, sparsity=1.0), "sparsity 1.0 outside [0, 1)"),
    (lambda m, c: GradualPruner(m, 1.2, total_steps=10), "sparsity 1.2 outside [0, 1)"),
    (lambda m, c: prune_magnitude_(m, sparsity=0.5, targets=["foo"]), "targets ['foo'] match no nn.Linear module"),
    (lambda m, c: prune_activation_(m, [], sparsity=0.5), "calibration set is empty"),
    (lambda m, c: prune_magnitude_(m), "give exactly one of sparsity or threshold"),
    (lambda m, c: prune_activation_(m, c, n_m=(2, 5)), "is not a multiple of 5"),
])
def test_bad_input_is_one_clear_error(model, calib, call, message):
    with pytest.raises(SlimtuneError, match=re.escape(message)):
        call(model, calib)
