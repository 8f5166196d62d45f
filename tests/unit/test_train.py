"""The training loop on tiny random BERTs: resume, schedules, early stopping, keep_best, autotune."""

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from slimtune.autotune import find_batch_size, find_lr
from slimtune.batching import EncodedDataset, collate
from slimtune.checkpoint import CheckpointStore
from slimtune.config import EarlyStopping, LoopConfig
from slimtune.tasks.classification import TextClassification
from slimtune.train import LoopSettings, TrainContext, cross_entropy_loss, optimizer_steps, train

CFG = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, num_labels=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(CFG)


@pytest.fixture(scope="module")
def ds():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 100, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
           for _ in range(120)]
    return EncodedDataset(ids, [int(x[0] > 50) for x in ids])


def stage(**kw):
    base = dict(epochs=2, lr=1e-3, batch_size=8, metric="accuracy")
    return LoopConfig(**(base | kw))


def loop(cfg, **overrides):
    """The settings of one loop run: `cfg` with its own lr and batch size."""
    return LoopSettings.from_config(cfg, lr=cfg.lr, batch_size=cfg.batch_size, **overrides)


def evaluating(eval_ds):
    return TextClassification().eval_fn(eval_ds, 0)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_seeded_runs_are_identical_and_seed_matters(ds):
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    ctx = TrainContext(progress=False)
    train(a, ds, loop(stage(seed=1)), ctx)
    train(b, ds, loop(stage(seed=1)), ctx)
    train(c, ds, loop(stage(seed=2)), ctx)
    assert same_weights(a, b)
    assert not same_weights(a, c)


@pytest.mark.parametrize("kw", [dict(grad_accum=1, schedule="linear"), dict(grad_accum=2, schedule="cosine"),
                                dict(grad_accum=1, schedule="plateau", eval_every=3),
                                dict(grad_accum=1, schedule="linear", eval_every=5, ema_decay=0.9)])
def test_resume_after_a_crash_ends_with_identical_weights(ds, tmp_path, kw):
    cfg = loop(stage(checkpoint_every=4, epochs=3, **kw))
    eval_fn = evaluating(ds.subset(range(20)))
    ref = tiny_model()
    ref_res = train(ref, ds, cfg, TrainContext(progress=False, checkpoints=CheckpointStore(tmp_path / "a")),
                    eval_fn=eval_fn)

    store = CheckpointStore(tmp_path / "b")
    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt  # a kill between two checkpoints
        return cross_entropy_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), ds, cfg, TrainContext(progress=False, checkpoints=store), loss_fn=crashing_loss,
              eval_fn=eval_fn)
    assert store.latest() is not None
    resumed = tiny_model(seed=99)  # different init: everything must come from the checkpoint
    res = train(resumed, ds, cfg, TrainContext(progress=False, checkpoints=store, resume=store.latest()),
                eval_fn=eval_fn)
    assert same_weights(ref, resumed)
    assert res.steps == ref_res.steps
    assert [h["accuracy"] for h in res.history] == [h["accuracy"] for h in ref_res.history]


def test_resume_of_a_finished_loop_returns_its_final_weights(ds, tmp_path):
    store = CheckpointStore(tmp_path)
    ref = tiny_model()
    train(ref, ds, loop(stage()), TrainContext(progress=False, checkpoints=store), eval_fn=evaluating(ds.subset(range(20))))
    again = tiny_model(seed=5)
    res = train(again, ds, loop(stage()), TrainContext(progress=False, checkpoints=store, resume=store.latest()),
                eval_fn=evaluating(ds.subset(range(20))))
    assert same_weights(ref, again) and res.steps == 30


def test_checkpoints_are_complete_or_absent(ds, tmp_path):
    store = CheckpointStore(tmp_path)
    train(tiny_model(), ds, loop(stage(checkpoint_every=2)), TrainContext(progress=False, checkpoints=store))
    done = store.complete()
    assert 1 <= len(done) <= 2
    for ck in done:
        assert {p.name for p in ck.iterdir()} == {"model.safetensors", "trainer.pt", "state.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def scripted_eval(values):
    it = iter(values)
    return lambda model: {"accuracy": next(it), "loss": 0.0, "f1_macro": 0.0}


def test_early_stopping_and_keep_best(ds):
    cfg = stage(epochs=10, early_stopping=EarlyStopping(patience=1), keep_best=True)
    model = tiny_model()
    snapshots = []
    values = [0.5, 0.9, 0.8, 0.7, 0.95, 0.99]

    def eval_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return scripted_eval(values[len(snapshots) - 1:])(m)

    res = train(model, ds, loop(cfg), TrainContext(progress=False), eval_fn=eval_fn)
    assert len(res.history) == 4 and res.stopped_early  # best at eval 2, then two evals without gain
    assert res.best_metric == 0.9
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())


def test_a_tie_on_the_metric_keeps_the_lower_loss(ds):
    """Accuracy on a small selection split ties often; the tied evaluation with the lower loss is kept (and
    counts as a best for early stopping), a tied one with a higher loss is not."""
    cfg = stage(epochs=4, keep_best=True)
    rows = [(0.6, 0.70), (0.6, 0.62), (0.6, 0.65), (0.5, 0.40)]
    model, snapshots = tiny_model(), []

    def eval_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        accuracy, loss = rows[len(snapshots) - 1]
        return {"accuracy": accuracy, "loss": loss}

    steps_per_epoch = math.ceil(len(ds) / 8)
    res = train(model, ds, loop(cfg), TrainContext(progress=False), eval_fn=eval_fn)
    assert res.best_metric == 0.6 and res.best_loss == 0.62 and res.best_step == 2 * steps_per_epoch
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("metric", ["loss", "perplexity"])
def test_a_lower_is_better_metric_keeps_the_lowest_eval(ds, metric):
    """`loss` goes down by default; another metric (a causal LM's perplexity) says so with higher_is_better."""
    cfg = stage(epochs=10, early_stopping=EarlyStopping(patience=1), keep_best=True, metric="loss")
    settings = loop(cfg) if metric == "loss" else loop(cfg, metric="perplexity", higher_is_better=False)
    assert settings.higher_is_better is False
    model, snapshots, values = tiny_model(), [], [5.0, 2.0, 3.0, 4.0, 1.0]

    def eval_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {metric: values[len(snapshots) - 1], "accuracy": 0.5}

    steps_per_epoch = math.ceil(len(ds) / 8)
    res = train(model, ds, settings, TrainContext(progress=False), eval_fn=eval_fn)
    assert len(res.history) == 4 and res.stopped_early  # best at eval 2 (the lowest), then two rises
    assert res.best_metric == 2.0 and res.best_step == 2 * steps_per_epoch
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())


def test_settings_hold_final_values_only():
    with pytest.raises(ValueError, match="auto"):
        LoopSettings.from_config(stage(lr="auto"), lr="auto", batch_size=8)
    with pytest.raises(ValueError, match="auto"):
        LoopSettings.from_config(stage(batch_size="auto"), lr=1e-3, batch_size="auto")
    s = LoopSettings.from_config(stage(lr="auto", batch_size="auto", early_stopping=EarlyStopping(patience=3,
                                                                                                   min_delta=0.1)),
                                 lr=2e-4, batch_size=16, epochs=0.5, keep_best=False)
    assert (s.lr, s.batch_size, s.epochs, s.keep_best) == (2e-4, 16, 0.5, False)
    assert (s.early_stopping_patience, s.min_delta, s.metric, s.higher_is_better) == (3, 0.1, "accuracy", True)
    assert optimizer_steps(100, s) == math.ceil(0.5 * math.ceil(100 / 16)) == 4
    with pytest.raises(TypeError):
        LoopSettings.from_config(stage(), lr=1e-3, batch_size=8, lerning_rate=1e-3)


def test_evaluations_before_best_from_step_neither_win_nor_stop(ds):
    """Gradual pruning: while the masks still move, a dev score is neither the kept best nor a miss."""
    cfg = stage(epochs=10, early_stopping=EarlyStopping(patience=0), keep_best=True)
    steps_per_epoch = train(tiny_model(), ds, loop(stage(epochs=1)), TrainContext(progress=False)).steps
    res = train(tiny_model(), ds, loop(cfg), TrainContext(progress=False), best_from_step=3 * steps_per_epoch,
                eval_fn=scripted_eval([0.9, 0.5, 0.4, 0.6, 0.7, 0.65]))
    assert len(res.history) == 6 and res.stopped_early  # no stop before eval 3; best at 5, miss at 6
    assert res.best_metric == 0.7 and res.best_step == 5 * steps_per_epoch


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("start", [0, 7])
def test_ema_is_what_is_evaluated_and_kept(ds, start):
    """With ema_decay the evaluations and the final model hold the running average of the weights
    after each optimizer step, from `best_from_step` on (gradual pruning: once the masks stop moving)."""
    model = tiny_model()
    model.bert.embeddings.requires_grad_(False)  # frozen tensors are not averaged (and stay as they are)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    reference, seen = {}, []

    def on_step(step):  # runs after the optimizer step, before the loop's own average is updated
        if step < start:
            return
        for n, w in trainable(model).items():
            reference[n] = w if n not in reference else 0.9 * reference[n] + 0.1 * w

    def eval_fn(m):
        if reference:  # before `start`, evaluations see the trained weights themselves
            seen.append(all(torch.allclose(w, reference[n], atol=1e-6) for n, w in trainable(m).items()))
        return {"accuracy": 0.5, "loss": 0.0, "f1_macro": 0.0}

    res = train(model, ds, loop(stage(ema_decay=0.9, keep_best=False, eval_every=4)), TrainContext(progress=False),
                eval_fn=eval_fn, on_step=on_step, best_from_step=start)
    assert seen and all(seen)
    assert [h.get("weights") for h in res.history] == [None if h["step"] < start else "ema" for h in res.history]
    assert all(torch.allclose(w, reference[n], atol=1e-6) for n, w in trainable(model).items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    plain = tiny_model()
    train(plain, ds, loop(stage(keep_best=False)), TrainContext(progress=False))
    assert not same_weights(plain, model)


def test_ema_decay_must_be_a_fraction():
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            stage(ema_decay=bad)


def test_min_delta_counts_small_gains_as_no_gain(ds):
    cfg = stage(epochs=10, early_stopping=EarlyStopping(patience=0, min_delta=0.05))
    res = train(tiny_model(), ds, loop(cfg), TrainContext(progress=False),
                eval_fn=scripted_eval([0.5, 0.52, 0.9, 0.9]))
    assert len(res.history) == 2


@pytest.fixture
def lr_log(monkeypatch):
    """The lr of every optimizer step."""
    lrs = []
    orig_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return lrs


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_warm_up_and_decay(ds, schedule, lr_log):
    train(tiny_model(), ds, loop(stage(schedule=schedule, warmup_ratio=0.2, epochs=2)), TrainContext(progress=False))
    assert lr_log[0] < lr_log[5] <= 1e-3 + 1e-12  # warm-up ramps up
    if schedule == "constant":
        assert lr_log[-1] == pytest.approx(1e-3)
    else:
        assert lr_log[-1] < 0.2e-3  # decays towards 0


def test_plateau_halves_lr_when_the_metric_stalls(ds, lr_log):
    cfg = stage(schedule="plateau", warmup_ratio=0.0, epochs=4, plateau_factor=0.5, plateau_patience=0)
    res = train(tiny_model(), ds, loop(cfg), TrainContext(progress=False),
                eval_fn=scripted_eval([0.5, 0.4, 0.4, 0.4]))
    assert len(res.history) == 4
    per_epoch = len(lr_log) // 4
    # epochs 1-2 at the full lr; evals 2 and 3 stall, each halving the lr for the epoch after it
    assert lr_log[0] == pytest.approx(1e-3) and lr_log[2 * per_epoch - 1] == pytest.approx(1e-3)
    assert lr_log[2 * per_epoch] == pytest.approx(5e-4)
    assert lr_log[-1] == pytest.approx(2.5e-4)


def test_injected_loss_is_the_one_used(ds):
    seen = []

    def loss_fn(model, batch):
        seen.append(batch["input_ids"].shape[0])
        return cross_entropy_loss(model, batch) * 0.0

    model, before = tiny_model(), tiny_model()
    train(model, ds, loop(stage(epochs=1, weight_decay=0.0)), TrainContext(progress=False), loss_fn=loss_fn)
    assert sum(seen) == len(ds)
    assert same_weights(model, before)  # zero loss, no decay: AdamW leaves weights unchanged


def test_bucketing_reduces_padding(ds):
    from slimtune.batching import batch_indices

    lengths = ds.lengths
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    bucketed = batch_indices(lengths, 8, shuffle=True, seed=0, bucket=True)
    plain = batch_indices(lengths, 8, shuffle=True, seed=0, bucket=False)
    assert sorted(i for b in bucketed for i in b) == list(range(len(ds)))
    assert padded(bucketed) < 0.8 * padded(plain)


def test_autotune_leaves_the_model_untouched(ds):
    model, ref = tiny_model(), tiny_model()
    make_batch = lambda d, idx: collate(d, idx, 0)  # noqa: E731
    lr, curve = find_lr(model, ds, cross_entropy_loss, make_batch, batch_size=8, steps=30)
    assert 1e-6 <= lr <= 1e-2 and len(curve) >= 10
    bs, speeds = find_batch_size(model, ds, cross_entropy_loss, make_batch, candidates=(4, 8, 16))
    assert bs in speeds and all(v > 0 for v in speeds.values())
    assert same_weights(model, ref)
    assert all(p.grad is None for p in model.parameters())


def test_a_run_chooses_on_its_selection_split_and_reports_on_eval(ds, monkeypatch):
    from helpers import make_run

    from slimtune.data import TaskData

    train_ds, select, evaluation = ds.subset(range(80)), ds.subset(range(80, 104)), ds.subset(range(104, 120))
    seen = []
    real = TextClassification.eval_fn

    def spy(self, eval_ds, pad_id):
        fn = real(self, eval_ds, pad_id)
        return lambda m: (seen.append(len(eval_ds)), fn(m))[1]

    monkeypatch.setattr(TextClassification, "eval_fn", spy)
    run = make_run(tiny_model(), TaskData(train=train_ds, eval=evaluation, labels={0: "0", 1: "1"}, select=select))
    res = run.fit(run.model, stage(epochs=2), lr=1e-3, batch_size=8)
    assert seen == [24, 24] and len(res.history) == 2  # keep_best and the dev curve: the selection split
    seen.clear()
    run.primary_metric(run.model)
    assert seen == [16]  # what stages report: the eval split
