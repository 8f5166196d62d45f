"""Distillation through `slimtune.run` on tiny random BERTs: students, losses, cache, multi-teacher, errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import slimtune as slimtune_cli

import slimtune
import slimtune.predict
from slimtune.distill.losses import layer_mapping, logit_mse_loss, soft_target_loss
from slimtune.distill.teachers import combine_teachers

EVAL = {"stage": "evaluate", "speed": False}
# transfer_augment: None keeps a word student's default transfer set (11x the rows) out of the tests of other things
DISTILL = {"stage": "distill", "epochs": 1, "lr": 1e-3, "batch_size": 16, "transfer_augment": None}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))


def recipe(model, sst2_small, *stages, **data):
    return {"model": str(model), "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 48,
                                          **data},
            "stages": list(stages)}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir, sst2_small):
    """A tiny BERT classifier fine-tuned by slimtune on the 300 SST-2 rows: the teacher."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    slimtune.run(recipe(tiny_model_dir, sst2_small,
                        {"stage": "finetune", "epochs": 2, "lr": 2e-3, "batch_size": 16}, EVAL), out, progress=False)
    return out / "model"


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, minilm_path):
    """A different student: hidden 48, 3 heads, 1 layer, and its own smaller tokenizer vocabulary."""
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(1)
    big = AutoTokenizer.from_pretrained(minilm_path)
    path = tmp_path_factory.mktemp("wide")
    vocab = [tok for tok, _ in sorted(big.get_vocab().items(), key=lambda kv: kv[1])][:8000]
    vocab = vocab[:999] + vocab[999:][::-1]  # same specials, other ids for every word piece
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                         intermediate_size=96, max_position_embeddings=128)).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------- losses
def test_soft_target_loss_is_zero_for_the_teachers_own_distribution_and_scales_with_t_squared():
    logits = torch.randn(8, 3)
    for t in (1.0, 4.0):
        assert soft_target_loss(logits, torch.softmax(logits / t, -1), t).abs() < 1e-6
    other = torch.randn(8, 3)
    kl = F.kl_div(F.log_softmax(other / 4, -1), torch.softmax(logits / 4, -1), reduction="batchmean")
    assert torch.allclose(soft_target_loss(other, torch.softmax(logits / 4, -1), 4.0), kl * 16)


def test_logit_mse_recovers_the_teachers_logits_from_its_softened_distribution():
    teacher = torch.randn(8, 3) * 3
    soft = torch.softmax(teacher / 2.0, -1)
    assert logit_mse_loss(teacher + 5.0, soft, 2.0) < 1e-8  # a constant shift is not an error
    student = torch.randn(8, 3)
    centred = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    want = ((centred(student) - centred(teacher)) ** 2).mean()
    assert torch.allclose(logit_mse_loss(student, soft, 2.0), want, atol=1e-4)


def test_uniform_mapping_follows_tinybert_and_explicit_pairs_are_checked():
    assert layer_mapping("uniform", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert layer_mapping("last", 6, 12) == [(6, 12)]
    with pytest.raises(slimtune.SlimtuneError, match="teacher layer 13 out of range"):
        layer_mapping([[1, 13]], 3, 12)


def test_multi_teacher_weighted_average_and_best_correct_teacher():
    labels = torch.tensor([0, 1, 1])
    right = torch.tensor([[4.0, 0.0], [0.0, 4.0], [3.0, 0.0]])  # wrong on example 2
    wrong = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 3.0]])
    labelled = torch.tensor([True, True, True])
    avg = combine_teachers([right, wrong], [3.0, 1.0], 1.0, "weighted", labels, labelled)
    expected = (3 * torch.softmax(right, -1) + torch.softmax(wrong, -1)) / 4
    assert torch.allclose(avg, expected)
    best = combine_teachers([right, wrong], [1.0, 1.0], 1.0, "best", labels, labelled)
    assert torch.allclose(best[0], torch.softmax(right[0], -1))  # both right: the more confident
    assert torch.allclose(best[1], torch.softmax(right[1], -1))
    assert torch.allclose(best[2], torch.softmax(wrong[2], -1))  # only the second teacher is right
    unlabelled = combine_teachers([right, wrong], [1.0, 1.0], 1.0, "best", labels, torch.tensor([False] * 3))
    assert torch.allclose(unlabelled, (torch.softmax(right, -1) + torch.softmax(wrong, -1)) / 2)


# -------------------------------------------------------------------------------------- students
def test_layer_selected_student_with_hidden_and_attention_losses_saves_as_plain_hf(tmp_path, teacher_dir,
                                                                                    sst2_small, monkeypatch):
    from helpers import spy_intermediate_loss
    from transformers import AutoModelForSequenceClassification

    added = spy_intermediate_loss(monkeypatch)
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"layers": [1]},
                       "intermediate": {"loss": "mse+attention", "mapping": "uniform"}}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), tmp_path / "out", progress=False)
    s = m["stages"][0]
    assert s["intermediate"] == {"mapping": [[1, 2]], "granularity": "token", "loss": "mse+attention"}
    assert len(added) == s["steps"] and min(added) > 0  # the hidden-state and attention terms trained every step
    assert 0.0 <= s["teachers"][0]["dev_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.num_hidden_layers == 1
    assert m["final"]["params"] == sum(p.numel() for p in model.parameters())
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    assert m["final"]["params"] < sum(p.numel() for p in teacher.parameters())


def test_a_layer_selection_of_the_runs_own_model_with_from_current(tmp_path, teacher_dir, tiny_model_dir, sst2_small):
    """`from: current` + layers: the layers of the model the run has reached (here the fine-tuned tiny BERT of
    the first stage), not the teacher's; without layers, the run's model itself."""
    first = {"stage": "finetune", "epochs": 1, "lr": 1e-3, "batch_size": 16}
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"from": "current", "layers": [1]}}
    m = slimtune.run(recipe(tiny_model_dir, sst2_small, first, stage, EVAL), tmp_path / "out", progress=False)
    record = m["stages"][1]
    assert (record["student"], record["student_source"]) == ("layers", "the run's model layers [1]")
    assert m["final"]["params"] < m["start"]["params"]  # one of the two layers
    whole = DISTILL | {"teacher": str(teacher_dir), "student": {"from": "current"}}
    m = slimtune.run(recipe(tiny_model_dir, sst2_small, whole, EVAL), tmp_path / "whole", progress=False)
    assert m["stages"][0]["student"] == "current"


def test_student_with_other_width_and_tokenizer_learns_through_pooled_projection(tmp_path, teacher_dir,
                                                                                 wide_model_dir, sst2_small,
                                                                                 monkeypatch):
    from helpers import spy_intermediate_loss
    from transformers import AutoTokenizer

    added = spy_intermediate_loss(monkeypatch)
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"from": str(wide_model_dir)}, "alpha": 0.9,
                       "intermediate": {"loss": "mse"}}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), tmp_path / "out", progress=False)
    assert m["stages"][0]["intermediate"]["granularity"] == "pooled"  # tokenizers differ
    assert len(added) == m["stages"][0]["steps"] and min(added) > 0  # the pooled MSE trained every step
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    assert len(saved) == 8000  # the student's own tokenizer is shipped with it
    pred = slimtune.predict.Predictor(str(tmp_path / "out" / "model"))(["a fine film"])
    assert pred[0]["label"] in {"0", "1"}


def test_attention_loss_needs_matching_heads(tmp_path, teacher_dir, wide_model_dir, sst2_small):
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"from": str(wide_model_dir)},
                       "intermediate": {"loss": "attention"}}
    with pytest.raises(slimtune.SlimtuneError, match="attention maps can only be matched token by token"):
        slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_student_defaults_to_the_runs_model_and_distillation_beats_a_copy_of_nothing(tmp_path, teacher_dir,
                                                                                      tiny_model_dir, sst2_small):
    """alpha=1: only the teacher's soft targets teach; the student must end up agreeing with it."""
    stage = DISTILL | {"teacher": str(teacher_dir), "alpha": 1.0, "epochs": 3, "temperature": 1.0}
    slimtune.run(recipe(tiny_model_dir, sst2_small, stage, EVAL), tmp_path / "out", progress=False)
    texts = [json.loads(line)["text"] for line in sst2_small[1].read_text().splitlines()]
    student = slimtune.predict.Predictor(str(tmp_path / "out" / "model"))(texts)
    teacher = slimtune.predict.Predictor(str(teacher_dir))(texts)
    agree = sum(a["label"] == b["label"] for a, b in zip(student, teacher, strict=True)) / len(texts)
    assert agree > 0.8


# ------------------------------------------------------------------------------ cache and transfer
def test_teacher_outputs_are_cached_and_a_cache_for_other_data_is_refused(tmp_path, teacher_dir, sst2_small, capsys):
    cache = tmp_path / "teacher.safetensors"
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"layers": [0]}, "cache": str(cache), "max_steps": 2}
    slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "a", progress=False)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "b", progress=False)
    assert cache.stat().st_mtime_ns == stamp and "teacher outputs: cached" in capsys.readouterr().err
    with pytest.raises(slimtune.SlimtuneError, match="teacher cache was written for different data"):
        slimtune.run(recipe(teacher_dir, sst2_small, stage, train_limit=100), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_augmented_transfer_set_is_labelled_by_the_teacher_only(tmp_path, teacher_dir, sst2_small):
    # alpha 1 + logit MSE (Tang et al.): the augmented rows, which have no labels, carry all the loss
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"layers": [0]}, "max_steps": 2,
                       "transfer_augment": {"copies": 2, "seed": 0}, "alpha": 1.0, "soft_loss": "mse"}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "out", progress=False)
    # 300 train rows less the selection split's 30, and two augmented copies of each
    assert m["stages"][0]["transfer_rows"] == 810 and m["stages"][0]["augmented_transfer_rows"] == 540
    assert m["stages"][0]["soft_loss"] == "mse"


def test_two_teachers_with_weights(tmp_path, teacher_dir, sst2_small):
    second = tmp_path / "second"
    shutil.copytree(teacher_dir, second)
    stage = DISTILL | {"teacher": [str(teacher_dir), {"path": str(second), "weight": 2.0}], "combine": "best",
                       "student": {"layers": [0]}, "max_steps": 2}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "out", progress=False)
    assert [t["weight"] for t in m["stages"][0]["teachers"]] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------- errors
def test_teacher_with_other_labels_is_refused(tmp_path, teacher_dir, sst2_small):
    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "neg", "1": "pos"}, {"neg": 0, "pos": 1}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(slimtune.SlimtuneError, match="labels .* differ from the data's"):
        slimtune.run(recipe(teacher_dir, sst2_small, DISTILL | {"teacher": str(other)}), tmp_path / "o",
                     progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("stage", "message"), [
    ({"teacher": "/nonexistent/teacher"}, "model '/nonexistent/teacher': path not found"),
    ({"student": {"layers": [0, 5]}}, r"student.layers: index 5 out of range \(the model has 2"),
    ({"student": {"arch": "bilstm", "init_embeddings": "contextual", "embedding_layer": 3}},
     r"student.embedding_layer 3: the teacher has hidden states 0-2"),
    ({"student": {"arch": "bilstm", "init_embeddings": "output"}}, "init_embeddings"),
    ({"student": {"arch": "bilstm", "init_embeddings": "input", "extend_vocab": True}},
     "extend_vocab needs init_embeddings: contextual"),
    ({"student": {"arch": "bilstm", "init_embeddings": "input", "extra_words": 100}},
     "extra_words needs init_embeddings: contextual"),
    ({"student": {"arch": "bilstm", "init_embeddings": "contextual", "extra_words": "/nonexistent/words.txt"}},
     "/nonexistent/words.txt: cannot read the word list"),
    ({"student": {"arch": "bilstm", "init_embeddings": "contextual", "extra_words": 0}}, "extra_words must be"),
])
def test_bad_teacher_or_student(tmp_path, teacher_dir, sst2_small, stage, message):
    stage = DISTILL | {"teacher": str(teacher_dir)} | stage
    with pytest.raises(slimtune.SlimtuneError, match=message):
        slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_resume_after_a_distill_stage_rebuilds_the_student(tmp_path, teacher_dir, sst2_small):
    """Killed after distill + finetune finished but before the outputs: --resume rebuilds the 1-layer student."""
    stages = [DISTILL | {"teacher": str(teacher_dir), "student": {"layers": [0]}},
              {"stage": "finetune", "epochs": 1, "lr": 1e-4, "batch_size": 16}, EVAL]
    out = tmp_path / "out"
    first = slimtune.run(recipe(teacher_dir, sst2_small, *stages), out, progress=False, keep_checkpoints=True)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    again = slimtune.run(recipe(teacher_dir, sst2_small, *stages), out, resume=True, progress=False)
    assert again["final"]["accuracy"] == first["final"]["accuracy"]
    assert again["final"]["params"] == first["final"]["params"]


@pytest.mark.parametrize("arch", ["bilstm", "cnn"])
def test_word_level_student_distilled_saves_and_predicts(tmp_path, teacher_dir, sst2_small, arch):
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"arch": arch, "hidden": 16}, "epochs": 2,
                       "lr": 3e-3}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), tmp_path / "out", progress=False)
    assert m["stages"][0]["student"] == arch
    model = slimtune.load_model(tmp_path / "out" / "model")
    assert model.get_input_embeddings().weight.shape[1] == 32  # initialised from the teacher's embeddings
    pred = slimtune.predict.Predictor(str(tmp_path / "out" / "model"))(["a fine film", "dull"])
    assert len(pred) == 2 and set(pred[0]["probabilities"]) == {"0", "1"}


def test_word_student_with_frozen_contextual_embeddings_keeps_them(tmp_path, teacher_dir, sst2_small):
    from transformers import AutoTokenizer

    from slimtune.distill.wordvectors import contextual_word_vectors

    stage = DISTILL | {"teacher": str(teacher_dir), "epochs": 1, "lr": 3e-3,
                       "student": {"arch": "bilstm", "hidden": 16, "init_embeddings": "contextual",
                                   "freeze_embeddings": True, "table": "float32"}}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), tmp_path / "out", progress=False)
    model = slimtune.load_model(tmp_path / "out" / "model")
    emb = model.get_input_embeddings().weight.detach()
    assert m["stages"][0]["trainable_params"] == m["final"]["params"] - emb.numel()
    tok = slimtune.models.load_tokenizer(tmp_path / "out" / "model")
    teacher = slimtune.load_model(teacher_dir)
    want = contextual_word_vectors(["film", "the"], teacher, AutoTokenizer.from_pretrained(teacher_dir))  # layer 1 of 2
    torch.testing.assert_close(emb[[tok.vocab["film"], tok.vocab["the"]]], want, atol=1e-5, rtol=1e-5)


def test_a_compact_word_table_keeps_its_rows_within_half_a_step():
    from slimtune.wordmodels import CompactEmbedding

    torch.manual_seed(0)
    weight = torch.randn(50, 12) * torch.linspace(0.01, 5, 50).unsqueeze(1)  # rows of very different scales
    weight[0] = 0  # [PAD]
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    int8 = CompactEmbedding.from_float(weight, "int8")
    assert int8.qweight.dtype == torch.int8 and int8.scales.shape == (50, 1)
    step = weight.abs().amax(1, keepdim=True) / 127
    assert ((int8.weight - weight).abs() <= step / 2 + 1e-7).all()  # per row: within half of its own step
    torch.testing.assert_close(int8(ids), F.embedding(ids, int8.weight))
    assert int8(ids)[0, 0].abs().sum() == 0
    half = CompactEmbedding.from_float(weight, "float16")
    assert half.qweight.dtype == torch.float16 and not hasattr(half, "scales")
    torch.testing.assert_close(half(ids), weight[ids], atol=3e-3, rtol=1e-3)
    with pytest.raises(slimtune.SlimtuneError, match="table storage 'int4'"):
        CompactEmbedding(4, 2, "int4")


@pytest.mark.parametrize(("frozen", "storage"), [(True, "int8"), (False, "float16")])
def test_a_word_students_table_is_stored_small_and_ships_that_way(tmp_path, teacher_dir, sst2_small, frozen, storage):
    from safetensors import safe_open

    from slimtune.evaluate import count_parameters

    student = {"arch": "bilstm", "hidden": 8, "init_embeddings": "contextual", "freeze_embeddings": frozen,
               "extra_words": None, "table": storage}
    stage = DISTILL | {"teacher": str(teacher_dir), "epochs": 1, "student": student}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), tmp_path / "out", progress=False)
    record = m["stages"][0]
    model = slimtune.load_model(tmp_path / "out" / "model")  # through the model-directory gate
    assert model.config.table == storage
    rows, dims = model.config.vocab_size, model.config.embed_dim
    code_bytes = {"int8": 1, "float16": 2}[storage]
    scales = rows * 4 if storage == "int8" else 0
    assert record["table"] == storage and record["table_mb"] == round((rows * dims * code_bytes + scales) / 1e6, 3)
    if frozen:  # trained on the int8 table itself: nothing to compare before and after
        assert "select_accuracy_float_table" not in record
    else:  # trained in float, then stored: the selection split measured on both
        assert {"select_accuracy_float_table", f"select_accuracy_{storage}_table"} <= set(record)
    # the codes are the table's weights: every parameter counted, float table or not
    assert m["final"]["params"] == count_parameters(model)[0] == rows * dims + sum(
        p.numel() for name, p in model.named_parameters() if not name.startswith("embeddings"))
    with safe_open(tmp_path / "out" / "model" / "model.safetensors", "pt") as f:
        assert f.get_tensor("embeddings.qweight").dtype == {"int8": torch.int8, "float16": torch.float16}[storage]
    pred = slimtune.predict.Predictor(str(tmp_path / "out" / "model"))(["a fine film", "dull"])
    assert len(pred) == 2
    proc = slimtune_cli("eval", tmp_path / "out" / "model", "--data", sst2_small[1], "--no-speed")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == m["final"]["accuracy"]
    # an int8 table is integer codes: `slimtune pack` entropy-codes them and unpacks the very same file
    from slimtune.pack import pack_model, unpack_model

    if storage == "int8":
        pack_model(tmp_path / "out" / "model", tmp_path / "w.slim")
        unpack_model(tmp_path / "w.slim", tmp_path / "unpacked")
        assert ((tmp_path / "unpacked" / "model.safetensors").read_bytes()
                == (tmp_path / "out" / "model" / "model.safetensors").read_bytes())
    else:
        with pytest.raises(slimtune.SlimtuneError, match="not quantized"):
            pack_model(tmp_path / "out" / "model", tmp_path / "w.slim")


def test_resume_past_a_word_student_rebuilds_its_compact_table(tmp_path, teacher_dir, sst2_small):
    """The table was trained in float and stored in int8 at the end of the stage: a resumed run rebuilds
    the student with the int8 table, so the checkpoint's codes fit."""
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"arch": "bilstm", "hidden": 8, "table": "int8"}}
    out = tmp_path / "out"
    first = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), out, progress=False, keep_checkpoints=True)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    again = slimtune.run(recipe(teacher_dir, sst2_small, stage, EVAL), out, resume=True, progress=False)
    assert again["final"]["accuracy"] == first["final"]["accuracy"] and again["final"]["params"] == first["final"]["params"]
    assert slimtune.load_model(out / "model").config.table == "int8"


def test_a_table_storage_on_a_transformer_student_is_refused(tmp_path, teacher_dir, sst2_small):
    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"layers": [0], "table": "int8"}}
    with pytest.raises(slimtune.SlimtuneError, match="student.table int8: only a word student"):
        slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("student", [{"layers": [0], "lstm": "int8"}, {"arch": "cnn", "lstm": "int8"}])
def test_an_int8_lstm_without_an_lstm_is_refused(tmp_path, teacher_dir, sst2_small, student):
    stage = DISTILL | {"teacher": str(teacher_dir), "student": student}
    with pytest.raises(slimtune.SlimtuneError, match="student.lstm int8: only a word BiLSTM"):
        slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_bilstm_learns_the_teachers_pooled_state_through_a_projection(tmp_path, teacher_dir, sst2_small):
    """A BiLSTM's hidden states are its word vectors (0) and its outputs (1): its mean-pooled outputs learn the
    teacher's mean-pooled layer (standardised per dimension) through a learned projection."""
    from slimtune.distill.losses import DistillModel, make_distill_loss
    from slimtune.distill.wordlevel import build_word_student

    stage = DISTILL | {"teacher": str(teacher_dir), "student": {"arch": "bilstm", "hidden": 8},
                       "intermediate": {"loss": "mse", "mapping": [[1, 1]], "weight": 2.0}}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage, train_limit=48), tmp_path / "o", progress=False)
    assert m["stages"][0]["intermediate"] == {"mapping": [[1, 1]], "granularity": "pooled", "loss": "mse"}

    torch.manual_seed(0)  # the loss itself: soft-target term + weight * MSE(projection(mean of outputs), target)
    student, tok = build_word_student("bilstm", ["good film", "bad one here"], {0: "0", 1: "1"}, embed_dim=6, hidden=4)
    model = DistillModel(student, [(1, 3)], student.state_widths(), 5)
    batch = tok(["good film", "bad one here"], padding=True, return_tensors="pt")
    batch |= {"soft_targets": torch.tensor([[0.3, 0.7], [0.6, 0.4]]), "labelled": torch.tensor([False, False]),
              "labels": torch.tensor([1, 0]), "pooled3": torch.randn(2, 5)}
    student.eval()
    got = make_distill_loss(temperature=2.0, alpha=1.0, mapping=[(1, 3)], use_mse=True, weight=2.0)(model, batch)
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert [h.shape[-1] for h in out.hidden_states] == [6, 8]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.hidden_states[1] * mask).sum(1) / mask.sum(1)
    want = soft_target_loss(out.logits, batch["soft_targets"], 2.0) + 2.0 * F.mse_loss(
        model.projections["1_3"](pooled), batch["pooled3"])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("student", "loss", "message"), [
    ({"arch": "cnn"}, "mse", "the cnn student has only its word vectors to match"),
    ({"arch": "bilstm"}, "attention", "the bilstm student has no attention maps"),
])
def test_intermediate_losses_a_word_student_cannot_have_are_refused(tmp_path, teacher_dir, sst2_small, student, loss,
                                                                     message):
    stage = DISTILL | {"teacher": str(teacher_dir), "student": student, "intermediate": {"loss": loss}}
    with pytest.raises(slimtune.SlimtuneError, match=message):
        slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_chinese_word_student_uses_jieba_words(tmp_path, tiny_model_dir):
    """No Chinese set ships with the project: sentences written for this test."""
    from helpers import write_chinese_csv

    train = write_chinese_csv(tmp_path / "zh.csv")
    data = {"train": str(train), "text_field": "句子", "label_field": "标签", "eval_fraction": 0.2}
    teacher = {"model": str(tiny_model_dir), "data": data,
               "stages": [{"stage": "finetune", "epochs": 2, "lr": 1e-3, "batch_size": 8}]}
    slimtune.run(teacher, tmp_path / "teacher", progress=False)
    student = {"model": str(tiny_model_dir), "data": data,
               "stages": [DISTILL | {"teacher": str(tmp_path / "teacher" / "model"), "student": {"arch": "cnn"}}]}
    slimtune.run(student, tmp_path / "student", progress=False)
    words = json.loads((tmp_path / "student" / "model" / "word_vocab.json").read_text(encoding="utf-8"))["words"]
    assert {"喜欢", "电影", "推荐"} <= set(words)
    pred = slimtune.predict.Predictor(str(tmp_path / "student" / "model"))(["我很喜欢这个电影"])
    assert pred[0]["label"] in ("好评", "差评")


def _distill_config(**fields):
    from slimtune.stages.distill import DistillConfig

    return DistillConfig(stage="distill", teacher="T", **fields)


def test_a_word_student_alone_gets_the_measured_recipe_and_the_recipe_keeps_its_own_choices():
    from slimtune.config import AugmentConfig
    from slimtune.distill.word_defaults import epochs_for, span_copies, word_student_updates

    mpnet = (12, 768)  # layers, hidden size
    stage, student, notes = word_student_updates(_distill_config(student={"arch": "bilstm"}), *mpnet, 6920)
    assert student == {"init_embeddings": "contextual", "freeze_embeddings": True, "extend_vocab": True,
                       "extra_words": 50000, "pca_dims": 256, "table": "int8", "lstm": "int8"}
    # the phrase-level transfer set: 10 teacher-labelled spans per sentence, and 10 epochs over it
    assert stage == {"soft_loss": "mse", "alpha": 1.0, "lr": 1e-3, "batch_size": 64, "epochs": 10,
                     "transfer_augment": AugmentConfig.spans(10),
                     "intermediate": {"loss": "mse", "mapping": [[1, 6]]}}
    assert notes == ["the transfer set adds 10 random word spans of each train text, labelled by the teacher "
                     "(76,120 rows, labelled once and cached; transfer_augment: null turns it off)"]
    # spans until the set is ~70k rows: fewer for a large train set, none past it; the epochs follow its size
    assert [span_copies(n) for n in (300, 6920, 30000, 69999, 100000)] == [10, 10, 2, 1, 0]
    stage, _, notes = word_student_updates(_distill_config(student={"arch": "bilstm"}), *mpnet, 100000)
    assert "transfer_augment" not in stage and stage["epochs"] == 8 and not notes
    stage, _, notes = word_student_updates(_distill_config(student={"arch": "bilstm"}, transfer_augment=None),
                                           *mpnet, 6920)
    assert "transfer_augment" not in stage and stage["epochs"] == 8 and not notes  # turned off: as before
    # fewer rows, more epochs (the same number of optimizer steps), within [8, 40]
    assert epochs_for(2000, 64) == 26 and epochs_for(300, 64) == 40 and epochs_for(100000, 64) == 8
    cfg = _distill_config(student={"arch": "cnn", "table": "float32", "extra_words": None}, epochs=2, alpha=0.3)
    stage, student, _ = word_student_updates(cfg, *mpnet, 6920)
    assert "table" not in student and "extra_words" not in student and student["pca_dims"] == 256
    assert "lstm" not in student  # a CNN has no LSTM
    assert "epochs" not in stage and "alpha" not in stage and "intermediate" not in stage  # a CNN has no states
    # input embeddings asked for: nothing that works on contextual vectors is filled in
    cfg = _distill_config(student={"arch": "bilstm", "init_embeddings": "input", "freeze_embeddings": False})
    _, student, _ = word_student_updates(cfg, *mpnet, 6920)
    assert student == {"lstm": "int8"}
    # a teacher no wider than the PCA: no PCA
    assert "pca_dims" not in word_student_updates(_distill_config(student={"arch": "bilstm"}), 2, 32, 300)[1]


def test_a_teacher_without_contextual_vectors_is_said_so():
    from slimtune.distill.word_defaults import word_student_updates

    stage, student, notes = word_student_updates(_distill_config(student={"arch": "bilstm"}), 0, 32, 300)
    assert notes[0] == ("the teacher has no hidden layers, so it gives no contextual word vectors: the word table "
                        "starts from its input embeddings and trains (no extra words, no PCA)")
    assert student == {"init_embeddings": "input", "freeze_embeddings": False, "lstm": "int8"}
    assert "intermediate" not in stage


def test_the_defaults_a_word_student_ran_with_are_recorded(tmp_path, teacher_dir, sst2_small):
    stage = {k: v for k, v in DISTILL.items() if k != "transfer_augment"} | {
        "teacher": str(teacher_dir), "student": {"arch": "bilstm", "hidden": 8, "extra_words": None}, "epochs": 1}
    m = slimtune.run(recipe(teacher_dir, sst2_small, stage), tmp_path / "o", progress=False)
    record = m["stages"][0]
    # the phrase-level transfer set: 10 spans of each of the 270 train rows (30 held back to select on)
    assert record["word_student_defaults"]["transfer_augment"]["copies"] == 10
    assert record["transfer_rows"] == 270 * 11 and record["augmented_transfer_rows"] == 2700
    assert record["word_student_defaults"]["student"] == {"init_embeddings": "contextual", "freeze_embeddings": True,
                                                          "extend_vocab": True, "table": "int8", "lstm": "int8"}
    assert record["word_student_defaults"]["intermediate"]["mapping"] == [[1, 1]]  # the tiny teacher's middle
    assert record["soft_loss"] == "mse" and record["alpha"] == 1.0 and record["table"] == "int8"
    # the int8 LSTM it ships with, and what it cost on the selection rows against the float one
    assert record["lstm"] == "int8" and {"select_accuracy_float_lstm", "select_accuracy_int8_lstm"} <= set(record)
    saved = json.loads((tmp_path / "o" / "model" / "config.json").read_text())
    assert saved["lstm"] == "int8" and m["final"]["runtime"] == "torch fp32 (int8 word table, int8 LSTM kernels)"
    # OUT/recipe.yaml is the recipe as it ran (what the report shows): parsed again, it leaves nothing to fill in
    import yaml

    from slimtune.distill.word_defaults import word_student_updates
    from slimtune.recipe import parse_recipe

    ran = parse_recipe(yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())).stages[0]
    assert ran.soft_loss == "mse" and ran.lr == 1e-3 and ran.transfer_augment.copies == 10
    assert ran.student.init_embeddings == "contextual" and ran.student.lstm == "int8"
    assert word_student_updates(ran, 2, 32, 270)[:2] == ({}, {})
    assert "soft_loss: mse" in (tmp_path / "o" / "report.md").read_text()
    assert record["intermediate"]["mapping"] == [[1, 1]]
