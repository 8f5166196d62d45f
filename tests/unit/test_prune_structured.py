"""Structured pruning on tiny random BERTs: removal is exact slicing, sizes drop, saves load back."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

import slimtune
from slimtune.batching import EncodedDataset, collate
from slimtune.models import save_hf_model
from slimtune.prune import structured as S
from slimtune.train import cross_entropy_loss

CFG = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=48, num_labels=3, max_position_embeddings=64)
HEAD = 8  # head size: 32 / 4
HIDDEN = 32


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(copy.deepcopy(CFG)).eval()  # pruning edits the config in place


@pytest.fixture(scope="module")
def batches():
    """Four padded batches as slimtune.batching.collate makes them (varied lengths: padding matters)."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 100, (int(torch.randint(3, 16, (1,), generator=g)),), generator=g).tolist()
           for _ in range(32)]
    ds = EncodedDataset(ids, [x[0] % 3 for x in ids])
    return [collate(ds, list(range(i, i + 8))) for i in range(0, 32, 8)]


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def gates_for(plan, sizes):
    """1 for kept units, 0 for removed ones: the masked twin of a removal plan."""
    gates = [torch.ones(n) for n in sizes]
    for i, keep in plan.items():
        gates[i] = torch.zeros(sizes[i])
        gates[i][torch.as_tensor(keep, dtype=torch.long)] = 1.0
    return gates


# ----------------------------------------------------------------------- removal is exact slicing
def test_head_removal_equals_masking_and_shrinks_exactly(batches):
    model = tiny_model()
    plan = S.plan_heads(S.head_importance(model, batches), 0.5, uniform=False)  # global: uneven counts
    with S.head_gates(model, gates_for(plan, [4, 4, 4])):
        masked = logits(model, batches)
    before = n_params(model)
    S.prune_heads_(model, plan)
    removed = sum(4 - len(k) for k in plan.values())
    assert removed == 6
    assert before - n_params(model) == removed * (4 * HEAD * HIDDEN + 3 * HEAD)  # Q/K/V rows + biases, O columns
    assert torch.allclose(logits(model, batches), masked, atol=1e-5)
    attn = model.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size) == (len(plan[0]), len(plan[0]) * HEAD)


def test_ffn_removal_equals_masking_and_shrinks_exactly(batches):
    model = tiny_model()
    plan = S.plan_ffn(S.ffn_importance(model, batches), 0.5)
    with S.neuron_gates(model, gates_for(plan, [48, 48, 48])):
        masked = logits(model, batches)
    before = n_params(model)
    S.prune_ffn_(model, plan)
    assert before - n_params(model) == 3 * 24 * (2 * HIDDEN + 1)  # input row + bias, output column
    assert torch.allclose(logits(model, batches), masked, atol=1e-5)
    assert model.config.intermediate_size == 24


def test_layer_drop_equals_skipping(batches):
    model = tiny_model()
    importance = S.layer_importance(model, batches)
    drop = S.plan_layers(importance, 1)
    with S.skip_layers(model, drop):
        skipped = logits(model, batches)
    expected = n_params(model) - n_params(model.bert.encoder.layer[drop[0]])
    S.drop_layers_(model, drop)
    assert n_params(model) == expected and model.config.num_hidden_layers == 2
    assert torch.allclose(logits(model, batches), skipped, atol=1e-5)


def test_emptying_a_layer_is_refused_unless_asked(batches):
    model = tiny_model()
    with S.head_gates(model, gates_for({0: [1], 1: []}, [4, 4, 4])), S.skip_layers(model, [1]):
        reference = logits(model, batches)
    with pytest.raises(slimtune.SlimtuneError, match="layer 1: pruning every head would remove the layer"):
        S.prune_heads_(model, {0: [1], 1: []})
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 4  # refused before any change
    assert S.prune_heads_(model, {0: [1], 1: []}, drop_empty_layers=True) == [1]
    assert len(model.bert.encoder.layer) == model.config.num_hidden_layers == 2
    assert model.config.heads_per_layer == [1, 4]
    assert torch.allclose(logits(model, batches), reference, atol=1e-5)


# ------------------------------------------------------------------------------------ importance
def test_head_importance_is_the_head_mask_gradient(batches):
    model = tiny_model().double()  # float64: the finite differences below need the precision
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 2 * HEAD:3 * HEAD] = 0  # head 2 is dead
        for layer in model.bert.encoder.layer[1:]:
            layer.attention.output.dense.weight[:, HEAD:2 * HEAD] *= 8  # head 1 is loud
    imp = S.head_importance(model, batches[:1])
    assert imp[0, 2] == 0 and (imp[0, [0, 1, 3]] > 0).all()
    assert imp[1:].argmax(1).tolist() == [1, 1]
    assert torch.allclose(imp.norm(dim=1), torch.ones(3))

    # finite differences of the loss in a head gate give the same (normalised) scores
    def loss_at(layer, head, value):
        gates = [torch.ones(4) for _ in range(3)]
        gates[layer][head] = value
        with torch.no_grad(), S.head_gates(model, gates):
            return cross_entropy_loss(model, batches[0]).item()

    fd = torch.tensor([[abs(loss_at(i, h, 1 + 1e-4) - loss_at(i, h, 1 - 1e-4)) for h in range(4)] for i in range(3)])
    assert torch.allclose(fd / fd.norm(dim=1, keepdim=True), imp, atol=1e-4)


def test_weight_and_ffn_importance_see_dead_units(batches):
    model = tiny_model()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[5] = 0
        model.bert.encoder.layer[1].intermediate.dense.bias[5] = 0  # gelu(0) = 0: neuron 5 never fires
        model.bert.encoder.layer[2].attention.self.query.weight[3 * HEAD:] = 0
    for scores in (S.ffn_importance(model, batches), S.ffn_importance(model)):
        assert [len(s) for s in scores] == [48, 48, 48]
        assert scores[1][5] == 0 and (scores[1][torch.arange(48) != 5] > 0).all()
    by_weight = S.head_importance_by_weight(model)
    assert by_weight.shape == (3, 4) and by_weight[2, 3] < by_weight[2, :3].min()


def test_plans_and_bad_input(batches):
    imp = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.7, 0.05, 0.02], [0.6, 0.2, 0.04, 0.01]])
    assert S.plan_heads(imp, 0.5) == {0: [1, 2], 1: [0, 1], 2: [0, 1]}
    assert S.plan_heads(imp, 0.5, uniform=False) == {0: [1, 2, 3], 1: [0, 1], 2: [0]}
    assert S.plan_layers(torch.tensor([0.3, -0.1, 0.2]), 2) == [1, 2]
    with pytest.raises(slimtune.SlimtuneError, match=r"outside \[0, 1\)"):
        S.plan_ffn([torch.ones(4)], 1.0)
    with pytest.raises(slimtune.SlimtuneError, match="calibration set is empty"):
        S.head_importance(tiny_model(), [])
    with pytest.raises(slimtune.SlimtuneError, match="layer 7 does not exist"):
        S.drop_layers_(tiny_model(), [7])
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4,
                                                                  hidden_dim=48))
    with pytest.raises(slimtune.SlimtuneError, match="TransformerBlock: structured pruning supports"):
        S.head_importance_by_weight(distil)


# ------------------------------------------------------------------------------------- save/load
def test_uniform_ffn_and_layer_pruning_save_as_plain_hf(batches, tmp_path):
    model = tiny_model()
    S.prune_ffn_(model, S.plan_ffn(S.ffn_importance(model), 0.25))
    S.drop_layers_(model, [0])
    expected = logits(model, batches)
    save_hf_model(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertForSequenceClassification"]
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"]) == (36, 2)
    assert not {"slimtune_format", "heads_per_layer", "intermediate_per_layer"} & set(cfg)
    plain = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(plain, batches), expected, atol=1e-6)


def test_head_pruned_model_loads_with_slimtune_and_auto_classes(batches, tmp_path):
    model = tiny_model()
    S.prune_heads_(model, {0: [0, 3], 2: [1]})
    S.prune_ffn_(model, {1: torch.arange(10)})  # uneven widths too
    expected = logits(model, batches)
    save_hf_model(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["slimtune_format"] == "pruned" and cfg["model_type"] == "slimtune_pruned_bert"
    assert (cfg["heads_per_layer"], cfg["intermediate_per_layer"]) == ([2, 4, 1], [48, 10, 48])
    for loaded in (slimtune.load_model(tmp_path), AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()):
        assert type(loaded).__name__ == "PrunedBertForSequenceClassification"
        assert n_params(loaded) == n_params(model)
        assert torch.equal(logits(loaded, batches), expected)

    # a fresh interpreter: `import slimtune` alone makes transformers' Auto classes know the model type
    ids = batches[0]["input_ids"].tolist()
    code = ("import json, sys, torch, slimtune\nfrom transformers import AutoModelForSequenceClassification as A\n"
            f"m = A.from_pretrained({str(tmp_path)!r}).eval()\n"
            f"print(json.dumps(m(input_ids=torch.tensor({ids})).logits.tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        here = model(input_ids=batches[0]["input_ids"]).logits
    assert torch.allclose(torch.tensor(json.loads(out.stdout.splitlines()[-1])), here, atol=1e-6)


def test_weights_must_match_the_recorded_shapes(tmp_path):
    model = tiny_model()
    S.prune_heads_(model, {0: [0, 3]})
    save_hf_model(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["heads_per_layer"] = [3, 4, 4]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(slimtune.SlimtuneError, match="weights do not match the structure its config records"):
        slimtune.load_model(tmp_path)


def test_onnx_export_of_a_head_pruned_model_matches_torch(batches, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = tiny_model()
    model.config._attn_implementation = "eager"
    S.prune_heads_(model, {0: [0, 3], 1: [2], 2: [0, 1, 2]})
    b = batches[0]
    torch.onnx.export(model, (b["input_ids"], b["attention_mask"]), tmp_path / "m.onnx", dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "logits": {0: "batch"}})
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for b in batches[1:3]:  # other lengths and padding than the traced batch
        got = session.run(None, {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()})
        assert torch.allclose(torch.from_numpy(got[0]), logits(model, [b]), atol=1e-4)
