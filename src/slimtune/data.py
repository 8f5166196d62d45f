"""Task data: read a file, clean its texts, map labels to ids, split, sample, augment, tokenize.

Every problem with the user's data is one SlimtuneError line that starts with the file and, where
there is one, the line at fault: `data/train.csv:17: expected 2 columns, found 3`.

Order of work in `prepare_data`: rows are read and checked, labels mapped and the splits chosen on the
raw rows; only the rows that survive `train_limit`/`eval_limit` are cleaned (jieba on a big Chinese
file is slow), then the train split is augmented and both splits are tokenized.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimtune.augment import EmbeddingSynonyms, augment_texts
from slimtune.batching import EncodedDataset, encode
from slimtune.config import AugmentConfig, DataConfig, Preprocessing
from slimtune.errors import SlimtuneError
from slimtune.textprep import make_preprocessor

# ----------------------------------------------------------------------------------------- reading
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".json": "jsonl"}
FORMATS = ("csv", "tsv", "jsonl", "datasets")
SUPPORTED = ".csv, .tsv/.tab, .jsonl/.ndjson/.json, or a directory saved with datasets' save_to_disk"
# save_to_disk writes state.json + dataset_info.json for a Dataset, dataset_dict.json for a DatasetDict
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass
class _Table:
    """The rows of one data file, each with the file line it starts on (or its row number)."""

    path: Path
    rows: list[dict]
    numbers: list[int]
    by_line: bool = True  # False: `numbers` are 1-based row numbers (saved datasets, JSON lists)

    def where(self, index: int) -> str:
        n = self.numbers[index]
        return f"{self.path}:{n}" if self.by_line else f"{self.path}: row {n}"


def read_rows(path: Path, fmt: str = "auto") -> list[dict]:
    """The rows of a data file as dicts. `fmt` (csv, tsv, jsonl, datasets) overrides the extension."""
    return read_table(Path(path), fmt).rows


def read_table(path: Path, fmt: str = "auto") -> _Table:
    if not path.exists():
        raise SlimtuneError(f"{path}: data file not found")
    fmt = _format_of(path, fmt)
    if fmt == "datasets":
        table = _read_saved_dataset(path)
    elif path.is_dir():
        raise SlimtuneError(f"{path}: is a directory, not a {fmt} file")
    elif fmt == "csv":
        table = _read_delimited(path, decoded_lines(path), ",")
    elif fmt == "tsv":
        table = _read_delimited(path, decoded_lines(path), "\t")
    else:
        table = _read_json(path, decoded_lines(path))
    if not table.rows:
        raise SlimtuneError(f"{path}: {'dataset' if path.is_dir() else 'file'} is empty (no rows)")
    return table


def _format_of(path: Path, fmt: str) -> str:
    if fmt in FORMATS:
        return fmt
    if fmt != "auto":
        raise SlimtuneError(f"{path}: unknown data format '{fmt}' (choose one of {', '.join(FORMATS)})")
    if path.is_dir():
        return "datasets"
    if path.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[path.suffix.lower()]
    suffix = f"'{path.suffix}'" if path.suffix else "(no extension)"
    raise SlimtuneError(f"{path}: unknown data format {suffix}; supported: {SUPPORTED} "
                        "(or set data.format to csv, tsv, jsonl or datasets)")


def decoded_lines(path: Path) -> list[str]:
    """The file's lines with their line endings, decoded one by one so a bad byte gets its line number."""
    data = path.read_bytes()
    if data.startswith(UTF16_BOMS):
        raise SlimtuneError(f"{path}: file is UTF-16; save it as UTF-8")
    data = data.removeprefix(UTF8_BOM)
    lines = []
    # bytes.splitlines splits on \n, \r and \r\n only; str.splitlines would also split on U+2028 etc.
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
            raise SlimtuneError(f"{path}:{lineno}: not valid UTF-8 "
                                f"(byte 0x{raw[e.start]:02x} at column {column})") from None
    return lines


def _read_delimited(path: Path, lines: list[str], delimiter: str) -> _Table:
    """CSV (RFC 4180 quoting) or TSV (no quoting: GLUE-style TSVs hold stray quotes that would
    otherwise swallow the lines after them). The first non-blank record is the header."""
    kind, quoting = ("TSV", csv.QUOTE_NONE) if delimiter == "\t" else ("CSV", csv.QUOTE_MINIMAL)
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                records.append((start, cells))
            start = reader.line_num + 1  # a quoted field may span lines: the next record starts here
    except csv.Error as e:
        raise SlimtuneError(f"{path}:{reader.line_num}: malformed {kind} ({e})") from None
    if not records:
        return _Table(path, [], [])
    header_line, header = records[0]
    header = [name.strip() for name in header]
    duplicates = [name for name, count in Counter(header).items() if count > 1]
    if duplicates:
        raise SlimtuneError(f"{path}:{header_line}: column '{duplicates[0]}' appears twice in the header")
    rows, numbers = [], []
    for lineno, cells in records[1:]:
        if len(cells) != len(header):
            raise SlimtuneError(f"{path}:{lineno}: expected {len(header)} columns, found {len(cells)}")
        rows.append(dict(zip(header, cells, strict=True)))
        numbers.append(lineno)
    return _Table(path, rows, numbers)


def _read_json(path: Path, lines: list[str]) -> _Table:
    """JSON Lines; a file that starts with '[' is read as one JSON list of objects instead."""
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("["):
        return _read_json_list(path, "".join(lines))
    rows, numbers = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse_json(path, line.strip(), lineno)  # a trailing newline would shift e.lineno
        if not isinstance(row, dict):
            raise SlimtuneError(f"{path}:{lineno}: expected one JSON object per line, found {_json_kind(row)}")
        rows.append(row)
        numbers.append(lineno)
    return _Table(path, rows, numbers)


def _read_json_list(path: Path, text: str) -> _Table:
    items = _parse_json(path, text, 1)
    if not isinstance(items, list):
        raise SlimtuneError(f"{path}: expected a JSON list of objects, found {_json_kind(items)}")
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise SlimtuneError(f"{path}: row {number}: expected a JSON object, found {_json_kind(item)}")
    return _Table(path, items, list(range(1, len(items) + 1)), by_line=False)


def _parse_json(path: Path, text: str, first_line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lineno = first_line + e.lineno - 1
        raise SlimtuneError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise SlimtuneError(f"{path}:{first_line}: malformed JSON (nested too deeply)") from None


def _json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _read_saved_dataset(path: Path) -> _Table:
    if not path.is_dir() or not any((path / marker).is_file() for marker in DATASETS_MARKERS):
        raise SlimtuneError(f"{path}: not a dataset saved with datasets' save_to_disk "
                            f"(no {', '.join(DATASETS_MARKERS)})")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{path}: cannot load the saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise SlimtuneError(f"{path}: holds the splits {', '.join(ds)}; point the data path at one "
                                f"split directory, e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    rows = ds.to_list()
    return _Table(path, rows, list(range(1, len(rows) + 1)), by_line=False)


# ------------------------------------------------------------------------------------------ labels
_INT_LIKE = re.compile(r"[+-]?[0-9]+")


def normalise_label(value) -> int | str:
    """1, 1.0 and "1" are the same label (CSV values are all strings); other strings are names.
    Raises ValueError (with a reason, no location) for values that cannot be a class label."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a boolean; use 0/1 or label names")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"{value} is not a whole number; class labels are integers or names")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("the label is empty")
        return int(text) if _INT_LIKE.fullmatch(text) else text
    if value is None:
        raise ValueError("the label is null")
    raise ValueError(f"{value!r} is {_json_kind(value)}; expected an integer or a string")


def build_label_map(raw_labels: list, label_names: dict[int, str] | None = None
                    ) -> tuple[dict[str, int], dict[int, str]]:
    """(label2id, id2label), keyed by label name.

    Integer labels keep their value as id when they are exactly 0..K-1 (classes declared in
    `label_names` count, even if absent from the data), else they are numbered in sorted order;
    their names come from `label_names`, else str(value). String labels are numbered alphabetically.
    """
    values = set()
    for raw in raw_labels:
        try:
            values.add(normalise_label(raw))
        except ValueError as e:
            raise SlimtuneError(f"labels: {e}") from None
    if values and all(isinstance(v, int) for v in values):
        id2label = _int_label_names(values, label_names)
    else:  # names (a mix of numbers and names is treated as names)
        id2label = dict(enumerate(sorted({str(v) for v in values})))
    label2id = {name: i for i, name in id2label.items()}
    if len(label2id) < len(id2label):
        shared = next(n for n, c in Counter(id2label.values()).items() if c > 1)
        raise SlimtuneError(f"data.label_names: two labels share the name '{shared}'")
    return label2id, id2label


def _int_label_names(values: set[int], label_names: dict[int, str] | None) -> dict[int, str]:
    names = label_names or {}
    unnamed = sorted(v for v in values if label_names and v not in label_names)
    if unnamed:
        raise SlimtuneError(f"data.label_names: no name for label {unnamed[0]} "
                            f"(names given for {', '.join(map(str, sorted(names)))})")
    # position in the sorted values: equals the value itself when the values are 0..K-1
    return {i: str(names.get(v, v)) for i, v in enumerate(sorted(values | set(names)))}


def label_id(value, label2id: dict[str, int], label_names: dict[int, str] | None = None) -> int | None:
    """The id of a raw label value (1, "1" or a name), or None if it is not one of `label2id`."""
    label = normalise_label(value)
    candidates = [str(label)]
    if isinstance(label, int) and label_names and label in label_names:
        candidates.insert(0, label_names[label])
    for name in candidates:
        if name in label2id:
            return label2id[name]
    # A model with named labels (negative/positive) evaluated on a file of integer labels:
    # the integers can only be ids, as no label name is a number.
    if isinstance(label, int) and label in label2id.values() and not any(
            _INT_LIKE.fullmatch(name) for name in label2id):
        return label
    return None


# ---------------------------------------------------------------------------------- splits, samples
def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) sorted indices; `fraction` of the rows held out with the class proportions kept."""
    indices = np.arange(len(labels))
    try:
        from sklearn.model_selection import train_test_split

        kept, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single example, or fewer held-out rows than classes
        order = np.random.default_rng(seed).permutation(len(labels))
        n_held = min(max(len(labels) - 1, 0), math.ceil(len(labels) * fraction))
        held, kept = order[:n_held], order[n_held:]
    return sorted(kept.tolist()), sorted(held.tolist())


def split_rows(cfg: DataConfig, fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held) raw rows of the train file, `fraction` held with the class proportions kept: a split a
    tool writes out as files (search's selection split), each row exactly as read."""
    examples = _load_examples(cfg.train, cfg.format, cfg.text_field, cfg.label_field, cfg.text_pair_field)
    label2id, _ = _train_label_map(cfg, examples)
    kept, held = stratified_split(_label_ids(examples, cfg.label_field, label2id, cfg.label_names), fraction, seed)
    rows = examples.table.rows
    return [rows[i] for i in kept], [rows[i] for i in held]


def stratified_sample(labels: list[int], n: int, seed: int) -> list[int]:
    """Sorted indices of `n` rows drawn with the class proportions kept (all rows if n >= len)."""
    if n >= len(labels):
        return list(range(len(labels)))
    indices = np.arange(len(labels))
    try:
        from sklearn.model_selection import train_test_split

        picked, _ = train_test_split(indices, train_size=n, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single example, or n smaller than the number of classes
        picked = np.random.default_rng(seed).choice(indices, size=n, replace=False)
    return sorted(picked.tolist())


# -------------------------------------------------------------------------------------- task data
@dataclass
class _Examples:
    """Raw texts and normalised labels of one file, row by row (the table gives error locations)."""

    table: _Table
    texts: list[str]
    pairs: list[str] | None
    labels: list[int | str]


def _load_examples(path: Path, fmt: str, text_field: str, label_field: str,
                   pair_field: str | None) -> _Examples:
    table = read_table(Path(path), fmt)
    count = range(len(table.rows))
    return _Examples(
        table=table,
        texts=[_text_of(table, i, text_field) for i in count],
        pairs=[_text_of(table, i, pair_field) for i in count] if pair_field else None,
        labels=[_label_of(table, i, label_field) for i in count],
    )


def _field_of(table: _Table, index: int, name: str):
    row = table.rows[index]
    if name not in row:
        present = ", ".join(row) or "none"
        raise SlimtuneError(f"{table.where(index)}: missing field '{name}' (fields present: {present})")
    return row[name]


def _text_of(table: _Table, index: int, name: str) -> str:
    value = _field_of(table, index, name)
    if not isinstance(value, str):
        raise SlimtuneError(f"{table.where(index)}: field '{name}' is {_json_kind(value)}, expected a string")
    return value


def _label_of(table: _Table, index: int, name: str) -> int | str:
    try:
        return normalise_label(_field_of(table, index, name))
    except ValueError as e:
        raise SlimtuneError(f"{table.where(index)}: field '{name}': {e}") from None


def _label_ids(examples: _Examples, label_field: str, label2id: dict[str, int],
               label_names: dict[int, str] | None) -> list[int]:
    ids = []
    for index, value in enumerate(examples.labels):
        found = label_id(value, label2id, label_names)
        if found is None:
            known = ", ".join(list(label2id)[:20]) + (", ..." if len(label2id) > 20 else "")
            raise SlimtuneError(f"{examples.table.where(index)}: label '{value}' in field '{label_field}' "
                                f"does not occur in the training data (known: {known})")
        ids.append(found)
    return ids


def _train_label_map(cfg: DataConfig, train: _Examples) -> tuple[dict[str, int], dict[int, str]]:
    label2id, id2label = build_label_map(train.labels, cfg.label_names)
    if len(id2label) < 2:
        raise SlimtuneError(f"{cfg.train}: field '{cfg.label_field}' holds a single label "
                            f"('{id2label.get(0, '')}'); a classifier needs at least two")
    return label2id, id2label


def label_map_of(cfg: DataConfig, keep: dict[int, str] | None = None) -> tuple[dict[str, int], dict[int, str]]:
    """The (label2id, id2label) `prepare_data` will use, with bad rows reported by file and line.
    Cheap: reads the train file but cleans and tokenizes nothing.

    `keep`: the labels (id -> name) a starting model was already trained for. When every label of the
    train file is one of them they are returned as they are (their ids and order, so the model's head
    still means what it meant; a single label is then enough); else the train file's own map. Integer
    labels without `label_names` count as the model's ids when its labels are names, as eval reads them."""
    train = _load_examples(cfg.train, cfg.format, cfg.text_field, cfg.label_field, cfg.text_pair_field)
    if keep:
        kept = {name: i for i, name in keep.items()}
        _, found = build_label_map(train.labels, cfg.label_names)
        as_ids = cfg.label_names is None and all(label_id(v, kept) is not None for v in set(train.labels))
        if set(found.values()) <= set(kept) or as_ids:
            return kept, dict(keep)
    return _train_label_map(cfg, train)


SELECT_SOURCE = "held back from train (select_fraction)"
EVAL_IS_SELECT = "the eval split (select_fraction: 0; its figures are optimistic)"


@dataclass
class TaskData:
    """The splits as the model sees them, plus what the task knows about its outputs (`labels`: id -> name
    for classification; empty for tasks without a label set). `select`, carved from the training data,
    is what checkpoints and settings are chosen on; `eval` only reports (`select` is `eval` itself when
    the recipe sets `select_fraction: 0`)."""

    train: EncodedDataset
    eval: EncodedDataset
    labels: dict[int, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # files, row counts, eval source, label counts
    select: EncodedDataset | None = None

    def __post_init__(self):
        if self.select is None:
            self.select = self.eval

    @property
    def selects_on_eval(self) -> bool:
        return self.select is self.eval

    @property
    def id2label(self) -> dict[int, str]:
        return self.labels

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.labels.items()}


def prepare_data(cfg: DataConfig, tokenizer, embedding_weight: torch.Tensor | None = None,
                 label2id: dict[str, int] | None = None) -> TaskData:
    """Train and eval splits, tokenized. Pass `label2id` to keep an already-trained model's labels."""
    train = _load_examples(cfg.train, cfg.format, cfg.text_field, cfg.label_field, cfg.text_pair_field)
    if label2id is None:
        label2id, id2label = _train_label_map(cfg, train)
    else:
        label2id = {str(name): int(i) for name, i in label2id.items()}
        id2label = {i: name for name, i in sorted(label2id.items(), key=lambda item: item[1])}
    train_ids = _label_ids(train, cfg.label_field, label2id, cfg.label_names)

    if cfg.eval is not None:
        evaluation = _load_examples(cfg.eval, cfg.format, cfg.text_field, cfg.label_field, cfg.text_pair_field)
        eval_ids = _label_ids(evaluation, cfg.label_field, label2id, cfg.label_names)
        train_rows, eval_rows = list(range(len(train_ids))), list(range(len(eval_ids)))
    else:
        evaluation, eval_ids = train, train_ids
        train_rows, eval_rows = stratified_split(train_ids, cfg.eval_fraction, cfg.split_seed)
    train_rows = _limited(train_rows, train_ids, cfg.train_limit, cfg.split_seed)
    eval_rows = _limited(eval_rows, eval_ids, cfg.eval_limit, cfg.split_seed)
    if not eval_rows:
        raise SlimtuneError(f"{cfg.train}: too few rows ({len(train_ids)}) to hold out an eval split; "
                            "set data.eval to an eval file")
    select_rows: list[int] = []
    if cfg.select_fraction:
        kept, held = stratified_split([train_ids[r] for r in train_rows], cfg.select_fraction, cfg.split_seed + 1)
        train_rows, select_rows = [train_rows[k] for k in kept], [train_rows[h] for h in held]
        if not select_rows or not train_rows:
            raise SlimtuneError(f"{cfg.train}: too few train rows ({len(kept) + len(held)}) to carve a selection "
                                "split from; give more rows or set data.select_fraction: 0")

    preprocess = preprocessor_for(cfg)
    texts, pairs, labels = _selected(train, train_ids, train_rows, preprocess)
    eval_texts, eval_pairs, eval_labels = _selected(evaluation, eval_ids, eval_rows, preprocess)
    label_counts = {"train": _counts(labels, id2label), "eval": _counts(eval_labels, id2label)}
    select = None
    if select_rows:
        sel_texts, sel_pairs, sel_labels = _selected(train, train_ids, select_rows, preprocess)
        select = encode(tokenizer, sel_texts, sel_labels, sel_pairs, cfg.max_length)
        label_counts["select"] = _counts(sel_labels, id2label)
    n_train = len(texts)
    if cfg.augment is not None and cfg.augment.copies > 0:
        texts, labels, pairs = _augmented(texts, labels, pairs, cfg.augment, tokenizer, embedding_weight)

    info = {"train_file": str(cfg.train), "eval_file": str(cfg.eval) if cfg.eval is not None else None,
            "train_file_rows": len(train_ids), "train_rows": n_train, "eval_rows": len(eval_texts),
            "augmented_rows": len(texts) - n_train, "eval_source": "file" if cfg.eval is not None else "split",
            "select_rows": len(select_rows), "select_source": SELECT_SOURCE if select_rows else EVAL_IS_SELECT,
            "label_counts": label_counts}
    return TaskData(train=encode(tokenizer, texts, labels, pairs, cfg.max_length),
                    eval=encode(tokenizer, eval_texts, eval_labels, eval_pairs, cfg.max_length),
                    labels=id2label, info=info, select=select)


def _limited(rows: list[int], ids: list[int], limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= len(rows):
        return rows
    picked = stratified_sample([ids[r] for r in rows], limit, seed)
    return [rows[p] for p in picked]


def _selected(examples: _Examples, ids: list[int], rows: Sequence[int], preprocess: Callable[[str], str]
              ) -> tuple[list[str], list[str] | None, list[int]]:
    texts = [preprocess(examples.texts[r]) for r in rows]
    pairs = [preprocess(examples.pairs[r]) for r in rows] if examples.pairs is not None else None
    return texts, pairs, [ids[r] for r in rows]


def _counts(labels: list[int], id2label: dict[int, str]) -> dict[str, int]:
    counts = Counter(labels)
    return {name: counts.get(i, 0) for i, name in id2label.items()}


def _augmented(texts: list[str], labels: list[int], pairs: list[str] | None, cfg: AugmentConfig,
               tokenizer, embedding_weight: torch.Tensor | None):
    synonyms = None
    if embedding_weight is not None and (cfg.p_synonym > 0 or cfg.p_insert > 0):
        synonyms = EmbeddingSynonyms(tokenizer, embedding_weight, k=cfg.neighbours,
                                     min_similarity=cfg.min_similarity)
    return augment_texts(texts, labels, cfg, synonyms, pairs)


def load_eval_data(path, tokenizer, label2id: dict[str, int], pre: Preprocessing, fmt: str = "auto") -> EncodedDataset:
    """A labelled file for `slimtune eval`, preprocessed like the model's training data (`pre`)."""
    examples = _load_examples(Path(path), fmt, pre.text_field, pre.label_field, pre.text_pair_field)
    label2id = {str(name): int(i) for name, i in label2id.items()}
    ids = _label_ids(examples, pre.label_field, label2id, None)
    texts, pairs, labels = _selected(examples, ids, range(len(ids)), preprocessor_for(pre))
    return encode(tokenizer, texts, labels, pairs, pre.max_length)


def preprocessor_for(pre: Preprocessing) -> Callable[[str], str]:
    """The text function of a saved preprocessing record (the same one training used)."""
    return make_preprocessor(pre.clean, pre.lowercase, pre.segment_chinese)
