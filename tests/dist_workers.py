"""What the distributed tests run in each of several processes (`torch.multiprocessing.spawn` imports these
functions by name). Each writes what it found to TMP/rank{R}.json for the test to read."""

import functools
import json
import os
import sys
from pathlib import Path


def _join(rank: int, size: int, port: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    from slimtune import distributed

    distributed.init("cpu")
    return distributed


def leaves_the_group(worker):
    """Run `worker`, leave the process group, and end the process at once once its record is written. About one
    spawned child in 15 that ran models and collectives aborted afterwards, in C++ static destruction at
    interpreter exit (SIGABRT, "terminate called without an active exception", no Python frame), even with the
    group destroyed; a child that only joins, meets at a barrier and leaves never did in 40 runs. What the test
    checks is in TMP/rank{R}.json by then, so the successful path skips that teardown; a failure still raises."""
    @functools.wraps(worker)
    def run(rank: int, size: int, port: int, tmp: str) -> None:
        from slimtune import distributed

        try:
            worker(rank, size, port, tmp)
        finally:
            distributed.leave()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return run


def _report(tmp: str, rank: int, record: dict) -> None:
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(record))


@leaves_the_group
def collectives(rank: int, size: int, port: int, tmp: str) -> None:
    """Sharded evaluation against the same evaluation in one process (row counts not divisible by the world
    size), the gradient average, on_main's error and once_per_node."""
    d = _join(rank, size, port)
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from slimtune.batching import EncodedDataset
    from slimtune.errors import SlimtuneError
    from slimtune.evaluate import predict_logits
    from slimtune.lmdata import windows
    from slimtune.tasks.causal_lm import perplexity

    record: dict = {}
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clf = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32, num_labels=3))
    ds = EncodedDataset(input_ids=[rng.integers(5, 60, size=int(n)).tolist() for n in rng.integers(2, 9, size=7)],
                        labels=[0] * 7)
    sharded = predict_logits(clf, ds, batch_size=2)
    with d.local():
        whole = predict_logits(clf, ds, batch_size=2)
    record["logits_rows"] = len(sharded)
    record["logits_max_diff"] = float(np.abs(sharded - whole).max())

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    lm_ds = windows(rng.integers(1, 60, size=5 * 8 - 3).tolist(), 8)  # 5 windows, the last one short
    sharded_ppl = perplexity(lm, lm_ds, pad_id=0, batch_size=2)
    with d.local():
        whole_ppl = perplexity(lm, lm_ds, pad_id=0, batch_size=2)
    record["windows"] = len(lm_ds)
    record["tokens"] = [sharded_ppl["eval_tokens"], whole_ppl["eval_tokens"]]
    record["nll"] = [sharded_ppl["nll"], whole_ppl["nll"]]

    # gradients: `a` has one on rank 0 only, `b` on every rank (rank + 1), `c` on none
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    if rank == 0:
        a.grad = torch.full((3,), 4.0)
    b.grad = torch.full((3,), float(rank + 1))
    mean_loss = d.average_gradients_([a, b, c], loss=float(rank))
    record["grads"] = [a.grad.tolist(), b.grad.tolist(), c.grad is None]
    record["mean_loss"] = mean_loss

    def fails():
        raise ValueError("broken on rank 0")

    try:
        d.on_main(fails)
    except (ValueError, SlimtuneError) as e:
        record["on_main_error"] = f"{type(e).__name__}: {e}"
    record["on_main_value"] = d.on_main(lambda: f"from rank {d.world().rank}")

    d.once_per_node(lambda: (Path(tmp) / f"once-{rank}").write_text("ran"))
    record["once_files"] = sorted(p.name for p in Path(tmp).glob("once-*"))
    _report(tmp, rank, record)
    d.barrier()


@leaves_the_group
def fsdp(rank: int, size: int, port: int, tmp: str) -> None:
    """A tiny BERT classifier (hidden 32, 2 layers) trained 5 steps with torch's FSDP2 (`fully_shard`) on gloo,
    each rank on half of the global batch, against the same steps on the whole batch in one process."""
    d = _join(rank, size, port)
    import copy

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        _report(tmp, rank, {"skip": "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"})
        return
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=2))
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (8, 12), generator=gen)
    labels = torch.randint(0, 2, (8,), generator=gen)
    try:
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    except (RuntimeError, NotImplementedError) as e:
        _report(tmp, rank, {"skip": f"FSDP2 cannot shard on CPU with gloo in this torch: {e}"})
        return
    half = slice(rank * 4, rank * 4 + 4)
    # plain SGD: a weight's difference stays that of its gradients (Adam's normalisation would magnify the
    # rounding differences of near-zero gradients)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses, ref_losses = [], []
    try:
        for _ in range(5):
            loss = model(input_ids=ids[half], labels=labels[half]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            ref_loss = reference(input_ids=ids, labels=labels).loss
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_losses.append(ref_loss.item())
    except (RuntimeError, NotImplementedError) as e:
        _report(tmp, rank, {"skip": f"FSDP2 cannot train on CPU with gloo in this torch: {e}"})
        return
    full = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
    ref = dict(reference.named_parameters())
    diff = max(float((full[name] - ref[name].detach()).abs().max()) for name in full)
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    mean_losses = [d.all_reduce_sum([x])[0] / size for x in losses]
    _report(tmp, rank, {"losses": mean_losses, "ref_losses": ref_losses, "max_weight_diff": diff,
                        "sharded": sharded})
    d.barrier()
