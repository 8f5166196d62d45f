"""Word-level distillation students: the word tokenizer, BiLSTM/CNN classifiers, teacher-embedding init."""

import pytest
import torch

import slimtune
from slimtune.batching import collate, encode
from slimtune.config import LoopConfig
from slimtune.distill.wordlevel import build_word_student, init_embeddings_from_teacher
from slimtune.distill.wordvectors import contextual_word_vectors, principal_components, teacher_whole_words
from slimtune.errors import SlimtuneError
from slimtune.models import load_tokenizer, save_hf_model
from slimtune.predict import Predictor
from slimtune.train import LoopSettings, TrainContext, cross_entropy_loss, train
from slimtune.wordlists import common_words, read_word_list
from slimtune.wordmodels import UNK_ID, WordBiLSTMClassifier, WordCNNClassifier, WordTokenizer, word_config

ID2LABEL = {0: "neg", 1: "pos"}
POS = ["good movie", "great film , good acting", "a fine and great story", "good fun", "great !", "fine good work"]
NEG = ["bad movie", "awful film , bad acting", "a poor and awful story", "bad idea", "awful .", "poor bad work"]
TEXTS, LABELS = POS + NEG, [1] * len(POS) + [0] * len(NEG)
ARCHS = ["bilstm", "cnn"]


def student(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return build_word_student(arch, TEXTS, ID2LABEL, embed_dim=16, hidden=8, kernel_sizes=(2, 3), **kw)


def test_vocab_is_deterministic_frequency_ordered_with_specials_first():
    a = WordTokenizer.build(TEXTS)
    b = WordTokenizer.build(list(reversed(TEXTS)))
    assert a.words == b.words
    assert a.words[:3] == ["[PAD]", "[UNK]", "[SEP]"]
    # most frequent first, ties alphabetical
    assert a.words[3:7] == ["bad", "good", "awful", "great"]
    assert len(WordTokenizer.build(TEXTS, max_vocab=5)) == 5
    assert "fun" not in WordTokenizer.build(TEXTS, min_freq=2).vocab


def test_tokenizer_call_unknown_words_truncation_pairs_and_empty_text():
    tok = WordTokenizer.build(TEXTS)
    assert tok.tokenize("Good, movie!") == ["good", ",", "movie", "!"]
    ids = tok(["good zebra", ""])["input_ids"]
    assert ids[0] == [tok.vocab["good"], UNK_ID]
    assert ids[1] == [UNK_ID]  # never an empty sequence
    assert tok(["a b c d e f"], max_length=3)["input_ids"][0] == [tok.vocab["a"], UNK_ID, UNK_ID]
    pair = tok(["good movie great film"], ["bad"], max_length=4)["input_ids"][0]
    assert pair == [tok.vocab["good"], tok.vocab["movie"], tok.sep_token_id, tok.vocab["bad"]]
    enc = encode(tok, ["good movie", "bad"], [1, 0], max_length=8)
    assert enc.input_ids == [[tok.vocab["good"], tok.vocab["movie"]], [tok.vocab["bad"]]]
    assert enc.token_type_ids is None


def test_tokenizer_save_load_round_trip(tmp_path):
    tok = WordTokenizer.build(TEXTS, lowercase=False)
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, WordTokenizer)
    assert back.words == tok.words and back.lowercase is False and back.chinese is False
    assert back(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]


def test_chinese_texts_are_segmented_into_words():
    tok = WordTokenizer.build(["这部电影非常好看", "这部电影很无聊"], chinese=True)
    words = tok.tokenize("这部电影非常好看")
    assert 1 < len(words) < len("这部电影非常好看")  # words, not one token and not single characters
    assert "电影" in words
    assert UNK_ID not in tok("这部电影非常好看")["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_alone_equal_logits_inside_a_padded_batch(arch):
    model, tok = student(arch)
    model.eval()
    texts = ["good", "a fine and great story , good acting", "bad movie"]
    ds = encode(tok, texts, [0, 0, 0])
    with torch.no_grad():
        batch = model(**collate(ds, [0, 1, 2], with_labels=False)).logits
        for i in range(len(texts)):
            alone = model(**collate(ds, [i], with_labels=False)).logits
            torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_and_predictor(arch, tmp_path):
    model, tok = student(arch)
    model.eval()
    save_hf_model(model, tok, tmp_path / "m", {"clean": True, "lowercase": True, "max_length": 32})
    loaded = slimtune.load_model(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    assert isinstance(loaded, WordBiLSTMClassifier if arch == "bilstm" else WordCNNClassifier)
    assert loaded.config.id2label == ID2LABEL and loaded.config.label2id == {"neg": 0, "pos": 1}
    ds = encode(tok, TEXTS, LABELS)
    batch = collate(ds, list(range(len(ds))), with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    out = Predictor(str(tmp_path / "m"))(["Good movie!", ""])
    assert [set(r["probabilities"]) for r in out] == [{"neg", "pos"}] * 2
    assert all(r["label"] in ("neg", "pos") for r in out)


def test_an_int8_lstm_runs_in_eval_mode_follows_the_weights_and_saves_float(tmp_path):
    from torch.ao.nn.quantized.dynamic import LSTM as DynamicInt8LSTM

    model, tok = student("bilstm", dropout=0.0)
    ds = encode(tok, TEXTS, LABELS)
    batch = collate(ds, list(range(len(ds))), with_labels=False)
    model.eval()
    with torch.no_grad():
        float_logits = model(**batch).logits
    model.config.lstm = "int8"
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert isinstance(model.inference_lstm(), DynamicInt8LSTM)
    assert torch.equal(torch.rand(3), expected)  # making it left the training's random state alone
    with torch.inference_mode():
        int8_logits = model(**batch).logits
        for i in range(3):  # padding never enters (packed sequences); each step's activation scale is the
            # batch's, as in any dynamic int8 (ONNX Runtime's too), so a text alone moves by rounding only
            torch.testing.assert_close(model(**collate(ds, [i], with_labels=False)).logits[0], int8_logits[i],
                                       atol=0.01, rtol=0)
    assert not torch.equal(int8_logits, float_logits)  # int8 kernels did run ...
    torch.testing.assert_close(int8_logits, float_logits, atol=0.05, rtol=0)  # ... close to the float LSTM
    # training runs the float LSTM (gradients reach its weights); the int8 copy follows the changed weights,
    # also after a step of the fused AdamW the loop uses, which bumps no tensor version
    def int8_weight():
        return model.inference_lstm()._weight_bias()["weight"]["weight_ih_l0"].dequantize()

    before = int8_weight()
    model.train()
    cross_entropy_loss(model, collate(ds, [0, 1], with_labels=True)).backward()
    assert model.lstm.weight_ih_l0.grad is not None
    version = model.lstm.weight_ih_l0._version
    torch.optim.AdamW(model.parameters(), lr=0.1, fused=True).step()
    assert model.lstm.weight_ih_l0._version == version
    model.eval()
    after = int8_weight()
    assert not torch.equal(before, after) and model.inference_lstm() is model.inference_lstm()
    torch.testing.assert_close(after, model.lstm.weight_ih_l0.detach(), atol=after.abs().max().item() / 100, rtol=0)
    with torch.no_grad():  # an in-place edit in eval mode
        model.lstm.weight_ih_l0.mul_(2)
    torch.testing.assert_close(int8_weight(), 2 * after, atol=after.abs().max().item() / 50, rtol=0)
    model.load_state_dict({k: v / 2 if k == "lstm.weight_ih_l0" else v for k, v in model.state_dict().items()})
    torch.testing.assert_close(int8_weight(), after, atol=after.abs().max().item() / 50, rtol=0)
    # saved: float weights and the setting; loaded: the same int8 outputs
    save_hf_model(model, tok, tmp_path / "m", {"clean": True, "lowercase": True, "max_length": 32})
    loaded = slimtune.load_model(tmp_path / "m")
    assert loaded.config.lstm == "int8" and isinstance(loaded.inference_lstm(), DynamicInt8LSTM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    with pytest.raises(SlimtuneError, match="int8 for a bilstm"):
        word_config("cnn", 10, ID2LABEL, lstm="int8")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_training_steps_reduce_the_loss(arch):
    model, tok = student(arch, dropout=0.0)
    ds = encode(tok, TEXTS, LABELS)
    batch = collate(ds, list(range(len(ds))))

    def loss():
        model.eval()
        with torch.no_grad():
            return cross_entropy_loss(model, batch).item()

    before = loss()
    cfg = LoopSettings.from_config(LoopConfig(epochs=10, warmup_ratio=0.0, keep_best=False), lr=1e-2, batch_size=4)
    train(model, ds, cfg, TrainContext(progress=False))
    assert loss() < 0.5 * before
    assert model(**collate(ds, [0, 1], with_labels=True)).loss is not None


def test_init_embeddings_from_teacher_uses_the_mean_of_sub_token_rows(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(tiny_model_dir, local_files_only=True)
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    texts = [*TEXTS, "unbelievably distillation"]
    torch.manual_seed(0)
    model, tok = build_word_student("bilstm", texts, ID2LABEL, hidden=8, teacher=teacher, teacher_tokenizer=teacher_tok)
    assert model.config.embed_dim == teacher.config.hidden_size == 32
    rows = model.get_input_embeddings().weight.detach()
    teacher_rows = teacher.get_input_embeddings().weight.detach()
    for word in ("distillation", "good"):
        pieces = teacher_tok(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1 or word == "good"
        torch.testing.assert_close(rows[tok.vocab[word]], teacher_rows[pieces].mean(0))
    assert torch.count_nonzero(rows[0]) == 0  # [PAD] stays zero
    assert init_embeddings_from_teacher(model, tok, teacher, teacher_tok) == len(tok) - 3

    small, small_tok = student("cnn")
    with pytest.raises(SlimtuneError, match="embed_dim 16 != teacher embedding size 32"):
        init_embeddings_from_teacher(small, small_tok, teacher, teacher_tok)


def test_contextual_init_is_the_teachers_hidden_state_of_each_word_alone(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    texts = [*TEXTS, "unbelievably distillation"]
    model, tok = build_word_student("bilstm", texts, ID2LABEL, hidden=8, teacher=teacher, teacher_tokenizer=teacher_tok,
                                    init_from_teacher="contextual", embedding_layer=1)
    rows = model.get_input_embeddings().weight.detach()
    for word in ("distillation", "good"):  # [CLS] pieces [SEP]: the mean over the pieces at layer 1
        enc = teacher_tok(word, return_tensors="pt")
        with torch.no_grad():
            hidden = teacher(**enc, output_hidden_states=True).hidden_states[1][0, 1:-1]
        torch.testing.assert_close(rows[tok.vocab[word]], hidden.mean(0), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(rows[0]) == 0  # [PAD] stays zero
    # padding in a batch of words of different lengths does not change a word's vector
    alone = contextual_word_vectors(["distillation"], teacher, teacher_tok, layer=2)
    batched = contextual_word_vectors(["good", "distillation", "a"], teacher, teacher_tok, layer=2)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimtuneError, match="embedding_layer 3: the teacher has hidden states 0-2"):
        contextual_word_vectors(["good"], teacher, teacher_tok, layer=3)


def test_extend_vocab_gives_the_teachers_whole_words_a_contextual_vector(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    whole = teacher_whole_words(teacher_tok)
    assert "adored" in whole and "the" in whole
    assert not any(w.startswith("#") or not w.isalpha() for w in whole)  # no pieces, digits or marks
    assert all(len(teacher_tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in whole[:500])
    model, tok = build_word_student("bilstm", TEXTS, ID2LABEL, hidden=8, teacher=teacher, teacher_tokenizer=teacher_tok,
                                    init_from_teacher="contextual", extend_vocab=True, max_vocab=50000)
    plain = WordTokenizer.build(TEXTS)
    assert tok.words[: len(plain)] == plain.words  # the texts' words first, in their usual order
    assert "adored" not in plain.vocab and tok._ids("adored") != [UNK_ID]  # a new word is no longer [UNK]
    rows = model.get_input_embeddings().weight.detach()
    want = contextual_word_vectors(["adored"], teacher, teacher_tok)
    torch.testing.assert_close(rows[tok.vocab["adored"]], want[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimtuneError, match="extend_vocab needs init_embeddings: contextual"):
        build_word_student("bilstm", TEXTS, ID2LABEL, teacher=teacher, teacher_tokenizer=teacher_tok, extend_vocab=True)


def test_extra_words_get_contextual_vectors_on_top_of_max_vocab(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    extra = ["Valueless", "rehashed", "good", "don't", "scattershot"]
    model, tok = build_word_student("bilstm", TEXTS, ID2LABEL, hidden=8, teacher=teacher, teacher_tokenizer=teacher_tok,
                                    init_from_teacher="contextual", extra_words=extra, max_vocab=8)
    assert tok.words[:8] == WordTokenizer.build(TEXTS, max_vocab=8).words  # the cap is on the texts' words
    # lowercased like the texts; "good" is already there; "don't" would be split into 3 words: never looked up
    assert tok.words[8:] == ["rehashed", "scattershot", "valueless"]
    rows = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(rows[tok.vocab["scattershot"]], contextual_word_vectors(["scattershot"], teacher,
                                                                                       teacher_tok)[0])
    assert tok("utterly valueless")["input_ids"][1] != UNK_ID
    with pytest.raises(SlimtuneError, match="extra_words needs init_embeddings: contextual"):
        build_word_student("bilstm", TEXTS, ID2LABEL, teacher=teacher, teacher_tokenizer=teacher_tok,
                           extra_words=extra)


def test_common_words_are_the_most_frequent_first():
    words = common_words(1000)
    assert len(words) >= 990 and words[0] == "the" and "movie" in words
    assert "的" in common_words(50, chinese=True)


def test_word_list_file_errors_name_the_file_and_line(tmp_path):
    good = tmp_path / "words.txt"
    good.write_text("alpha\n\n beta \n", encoding="utf-8")
    assert read_word_list(good) == ["alpha", "beta"]
    bad = tmp_path / "bad.txt"
    bad.write_text("alpha\ntwo words\n", encoding="utf-8")
    with pytest.raises(SlimtuneError, match=r"bad.txt, line 2: one word per line"):
        read_word_list(bad)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(SlimtuneError, match="the word list is empty"):
        read_word_list(tmp_path / "empty.txt")
    with pytest.raises(SlimtuneError, match="missing.txt: cannot read the word list"):
        read_word_list(tmp_path / "missing.txt")


def test_pca_dims_keeps_the_leading_principal_components_of_the_teachers_vectors(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model, tok = build_word_student("bilstm", TEXTS, ID2LABEL, hidden=8, teacher=teacher, teacher_tokenizer=teacher_tok,
                                    init_from_teacher="contextual", pca_dims=5)
    assert model.config.embed_dim == 5 and model.lstm.input_size == 5
    full = contextual_word_vectors(tok.words[3:], teacher, teacher_tok)
    rows = model.get_input_embeddings().weight.detach()[3:]
    cov = torch.cov(rows.T.double())
    assert torch.allclose(cov - torch.diag(torch.diagonal(cov)), torch.zeros(5, 5, dtype=torch.double), atol=1e-6)
    variances = torch.diagonal(cov)
    assert torch.all(variances[:-1] >= variances[1:])  # leading axes first
    top = torch.linalg.svdvals(full.double() - full.double().mean(0))[:5] ** 2 / (len(full) - 1)
    torch.testing.assert_close(variances, top, rtol=1e-4, atol=1e-8)  # the most variance 5 axes can hold
    with pytest.raises(SlimtuneError, match=r"pca_dims 40: expected 1-\d+ \(the vectors are"):
        principal_components(full, 40)
    with pytest.raises(SlimtuneError, match="pca_dims needs init_embeddings: contextual"):
        build_word_student("bilstm", TEXTS, ID2LABEL, teacher=teacher, teacher_tokenizer=teacher_tok, pca_dims=5)


def test_contextual_vectors_are_cached_per_teacher_layer_and_words(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    import slimtune.distill.wordvectors as wv

    teacher = AutoModel.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    kw = dict(hidden=8, teacher=teacher, teacher_tokenizer=teacher_tok, init_from_teacher="contextual")
    first, _ = build_word_student("bilstm", TEXTS, ID2LABEL, vector_cache=(tmp_path, "teacher-a"), **kw)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(wv, "contextual_word_vectors", no_teacher)
    again, _ = build_word_student("bilstm", TEXTS, ID2LABEL, vector_cache=(tmp_path, "teacher-a"), **kw)
    torch.testing.assert_close(again.embeddings.weight[3:], first.embeddings.weight[3:])
    with pytest.raises(AssertionError, match="the teacher ran again"):  # another teacher: another entry
        build_word_student("bilstm", TEXTS, ID2LABEL, vector_cache=(tmp_path, "teacher-b"), **kw)
    with pytest.raises(AssertionError, match="the teacher ran again"):  # another layer too
        build_word_student("bilstm", TEXTS, ID2LABEL, vector_cache=(tmp_path, "teacher-a"), embedding_layer=2, **kw)
