"""`stage: vocabulary` (the embedding table and the WordPiece tokenizer trimmed to the tokens the training text
uses): what is kept, that kept text keeps its ids and the model its outputs, that other words split into
pieces, saving, ONNX int8 export, resume and bad input."""

import json
import shutil

import onnx
import pytest
import torch
from helpers import eval_split
from helpers import slimtune as slimtune_cli
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

import slimtune
from slimtune.evaluate import predict_logits
from slimtune.export import OnnxClassifier
from slimtune.models import load_tokenizer
from slimtune.vocabulary import check_same_tokens, kept_token_ids, trim_embeddings_, trimmed_tokenizer

FT = {"stage": "finetune", "epochs": 1, "lr": 1e-3, "batch_size": 16}
EVAL = {"stage": "evaluate", "speed": False}
TRAIN = ["a wonderful film", "the plot is dull", "wonderful acting , dull plot"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def recipe(tiny_model_dir, sst2_small, *stages) -> dict:
    return {"model": str(tiny_model_dir),
            "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 48},
            "stages": list(stages)}


def test_kept_ids_are_specials_characters_and_the_used_tokens(tokenizer):
    encoded = tokenizer(TRAIN)["input_ids"]
    kept = kept_token_ids(tokenizer, encoded)
    assert kept == sorted(set(kept))
    vocab = tokenizer.get_vocab()
    assert set(tokenizer.all_special_ids) <= set(kept)
    assert {vocab["a"], vocab["z"], vocab["##z"], vocab["wonderful"], vocab["dull"]} <= set(kept)
    assert vocab["terrible"] not in kept
    # min_count drops the tokens used once; words add their pieces
    twice = set(kept_token_ids(tokenizer, encoded, min_count=2))
    assert vocab["wonderful"] in twice and vocab["film"] not in twice and vocab["a"] in twice
    assert vocab["terrible"] in kept_token_ids(tokenizer, encoded, words=["terrible"])


def test_kept_text_keeps_its_ids_and_other_words_split_into_pieces(tokenizer, tmp_path):
    kept = kept_token_ids(tokenizer, tokenizer(TRAIN)["input_ids"])
    small = trimmed_tokenizer(tokenizer, kept)
    assert type(small) is type(tokenizer) and len(small) == len(kept) < len(tokenizer) / 10
    check_same_tokens(tokenizer, small, kept, TRAIN)
    new_id = {old: new for new, old in enumerate(kept)}
    pair = tokenizer("a wonderful film", "dull")
    assert small("a wonderful film", "dull")["input_ids"] == [new_id[i] for i in pair["input_ids"]]
    assert small("a wonderful film", "dull")["token_type_ids"] == pair["token_type_ids"]
    # a word never seen splits into kept pieces (single characters at worst), never into [UNK]
    pieces = small.tokenize("terrible")
    assert len(pieces) > 1 and small.unk_token not in pieces and small.convert_tokens_to_string(pieces) == "terrible"
    assert small.pad_token_id == new_id[tokenizer.pad_token_id]
    # it saves and loads back the same
    small.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("terrible acting")["input_ids"] == small("terrible acting")["input_ids"]
    assert again.decode(again("wonderful acting")["input_ids"], skip_special_tokens=True) == "wonderful acting"


def test_the_trimmed_model_gives_the_same_logits_on_kept_text(tokenizer):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, pad_token_id=0)).eval()
    kept = kept_token_ids(tokenizer, tokenizer(TRAIN)["input_ids"])
    small = trimmed_tokenizer(tokenizer, kept)
    with torch.no_grad():
        before = model(**tokenizer(TRAIN, padding=True, return_tensors="pt")).logits
        trim_embeddings_(model, kept)
        after = model(**small(TRAIN, padding=True, return_tensors="pt")).logits
    assert torch.allclose(before, after, atol=1e-6)
    assert model.config.vocab_size == len(kept) == model.get_input_embeddings().num_embeddings
    assert model.get_input_embeddings().padding_idx == model.config.pad_token_id == small.pad_token_id


def test_a_bpe_tokenizer_is_refused_with_its_kind():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<unk>": 3}, merges=[("a", "b")],
                                   unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(slimtune.SlimtuneError, match="vocabulary: the model's tokenizer is BPE, not WordPiece"):
        kept_token_ids(bpe, [[0, 1]])


def test_a_run_trims_saves_exports_and_loads(tmp_path, tiny_model_dir, sst2_small):
    out = tmp_path / "out"
    stages = [FT, {"stage": "vocabulary"}, {"stage": "quantize", "method": "dynamic_int8"}, EVAL]
    metrics = slimtune.run(recipe(tiny_model_dir, sst2_small, *stages), out, progress=False)
    s = metrics["stages"][1]
    # by default the pieces of the 10,000 most frequent English words are kept beside the train split's tokens
    assert s["vocab_before"] == 30522 and 1000 < s["vocab_after"] < 30522 / 2 and s["extra_words"] == 10000
    assert 0 < s["eval_texts_resplit"] < 1 and s["params_after"] == s["params_before"] - 32 * (30522 - s["vocab_after"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["vocab_size"] == s["vocab_after"]
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert len(tokenizer) == s["vocab_after"]
    # the saved model and tokenizer score the eval file as the run did; its int8 ONNX export holds the small table
    proc = slimtune_cli("eval", out / "model", "--data", sst2_small[1], "--no-speed")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == metrics["final"]["accuracy"]
    graph = onnx.load(out / "onnx" / "model.onnx")
    tables = [i for i in graph.graph.initializer if "word_embeddings" in i.name]
    assert tables and all(t.dims[0] == s["vocab_after"] for t in tables)
    # the export ships the trimmed tokenizer: ONNX Runtime, fed by it, predicts what torch does
    assert metrics["final"]["onnx"]["onnx_accuracy"] == metrics["final"]["onnx"]["torch_accuracy"]
    model, ds, _ = eval_split(out / "model", sst2_small[1])
    shipped = load_tokenizer(out / "onnx")
    assert shipped(ds.texts[:20])["input_ids"] == tokenizer(ds.texts[:20])["input_ids"]
    got = OnnxClassifier(out / "onnx" / "model.onnx").predict_logits(ds, tokenizer.pad_token_id)
    want = predict_logits(model, ds, pad_id=tokenizer.pad_token_id)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_resume_past_a_vocabulary_stage_trims_again(tmp_path, tiny_model_dir, sst2_small):
    stages = [FT | {"max_steps": 2}, {"stage": "vocabulary", "min_count": 2}, FT | {"max_steps": 3}, EVAL]
    out = tmp_path / "out"
    first = slimtune.run(recipe(tiny_model_dir, sst2_small, *stages), out, progress=False, keep_checkpoints=True)
    shutil.copytree(out / "model", tmp_path / "first")
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    again = slimtune.run(recipe(tiny_model_dir, sst2_small, *stages), out, resume=True, progress=False)
    assert again["final"]["params"] == first["final"]["params"]
    assert again["final"]["accuracy"] == first["final"]["accuracy"]
    # (padding and truncation in tokenizer.json are the tokenizer's runtime state when saved)
    saved = [json.loads((d / "tokenizer.json").read_text()) for d in (out / "model", tmp_path / "first")]
    assert [(s["model"], s["added_tokens"], s["post_processor"]) for s in saved][0] == (
        saved[1]["model"], saved[1]["added_tokens"], saved[1]["post_processor"])


@pytest.mark.parametrize(("stage", "message"), [
    ({"min_count": 0}, r"stages.1.min_count: Input should be greater than or equal to 1"),
    ({"extra_words": "no_such_words.txt"}, r"no_such_words.txt: cannot read the word list"),
    ({"extra_words": -1}, r"stages.1.extra_words: a word count must be 0 or more"),
    ({"keep": 3}, r"stages.1.keep: unknown key \(valid keys: stage, min_count, extra_words\)"),
])
def test_bad_vocabulary_input_fails_before_any_output(tmp_path, tiny_model_dir, sst2_small, stage, message):
    with pytest.raises(slimtune.SlimtuneError, match=message):
        slimtune.run(recipe(tiny_model_dir, sst2_small, FT, {"stage": "vocabulary"} | stage), tmp_path / "out",
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_a_causal_lm_recipe_refuses_the_stage(tmp_path, tiny_llama_dir, text_files):
    with pytest.raises(slimtune.SlimtuneError, match="stage 'vocabulary' is not available for task causal-lm"):
        slimtune.run({"task": "causal-lm", "model": str(tiny_llama_dir),
                      "data": {"train": str(text_files / "train.txt"), "block_size": 32},
                      "stages": [{"stage": "vocabulary"}]}, tmp_path / "out", progress=False)


def test_without_wordfreq_the_default_keeps_the_train_tokens_and_says_so(tmp_path, tiny_model_dir, sst2_small,
                                                                         monkeypatch, capsys):
    import slimtune.stages.vocabulary as stage

    monkeypatch.setattr(stage, "find_spec", lambda name: None)
    metrics = slimtune.run(recipe(tiny_model_dir, sst2_small, {"stage": "vocabulary"}, EVAL), tmp_path / "out",
                           progress=False)
    s = metrics["stages"][0]
    assert s["extra_words"] == 0 and s["vocab_after"] < 30522 / 3
    assert "the wordfreq package is missing" in capsys.readouterr().err
    # a word count the recipe asks for is not dropped silently
    with pytest.raises(slimtune.SlimtuneError, match="extra_words: a word count needs the wordfreq package"):
        monkeypatch.setitem(__import__("sys").modules, "wordfreq", None)
        slimtune.run(recipe(tiny_model_dir, sst2_small, {"stage": "vocabulary", "extra_words": 100}, EVAL),
                     tmp_path / "again", progress=False)
