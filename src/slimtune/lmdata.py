"""Causal-LM data: a text file, JSON Lines of texts, or instruction rows -> token blocks and eval windows.

- Text (a raw file such as WikiText-2 or Tiny Shakespeare, or the `text_field` of JSON Lines rows joined
  by the end-of-text token) becomes one token stream, packed into `block_size` blocks for training.
- Instruction rows (`prompt_field` / `response_field`) go through the tokenizer's chat template (a plain
  "prompt\\n" + response + EOS without one); the prompt's tokens are masked from the loss, so only the
  response is learned. Each row stays one example (truncated to `block_size`).
- Evaluation slides a `block_size` window over the eval stream by `stride` tokens; each window scores
  only the tokens no earlier window scored, with everything before them as context (the usual sliding
  perplexity: the token-level NLL of the whole text, each token counted once).

Without an eval file, the last `eval_fraction` of the train stream (or a seeded share of instruction rows)
is held back: those tokens are never trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.batching import EncodedDataset
from slimtune.config import CausalLMData
from slimtune.data import EVAL_IS_SELECT, SELECT_SOURCE, TaskData, decoded_lines, read_table
from slimtune.errors import SlimtuneError
from slimtune.textprep import clean_text

IGNORE_INDEX = -100  # label of a token the loss skips (prompt, padding, context-only window prefix)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TOKENIZE_CHARS = 1_000_000  # tokenize big texts in pieces of about this many characters, cut at line ends


@dataclass
class LMTokens:
    """A file's tokens: one stream (text), or one (ids, labels) pair per instruction row."""

    path: Path
    stream: list[int] | None = None
    examples: list[tuple[list[int], list[int]]] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.stream) if self.stream is not None else sum(len(ids) for ids, _ in self.examples or [])


def read_lm_tokens(path: Path, cfg: CausalLMData, tokenizer, limit: int | None = None) -> LMTokens:
    """Tokens of one data file (`limit`: only the first N tokens of a text stream)."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: data file not found" if not path.exists() else f"{path}: not a file")
    fmt = cfg.format if cfg.format != "auto" else ("jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text")
    if fmt == "text":
        lines = decoded_lines(path)
        text = "\n".join(clean_text(line) for line in lines) if cfg.clean else "".join(lines)
        stream = tokenize_text(text, tokenizer, limit)
        if not stream:
            raise SlimtuneError(f"{path}: text file is empty (no tokens)")
        return LMTokens(path, stream=stream)
    table = read_table(path, "jsonl")
    if cfg.prompt_field in table.rows[0]:
        return LMTokens(path, examples=_instruction_examples(table, cfg, tokenizer))
    texts = []
    for i, row in enumerate(table.rows):
        value = row.get(cfg.text_field)
        if not isinstance(value, str):
            what = "missing" if value is None else f"a {type(value).__name__}, not text"
            raise SlimtuneError(f"{table.where(i)}: field '{cfg.text_field}' is {what} (rows need text, or "
                                f"'{cfg.prompt_field}' and '{cfg.response_field}' for instruction data)")
        texts.append(clean_text(value) if cfg.clean else value)
    eos = tokenizer.eos_token or "\n\n"  # documents end with the end-of-text token, as in pretraining
    stream = tokenize_text(eos.join(texts), tokenizer, limit)
    if not stream:
        raise SlimtuneError(f"{path}: no text in field '{cfg.text_field}'")
    return LMTokens(path, stream=stream)


def tokenize_text(text: str, tokenizer, limit: int | None = None) -> list[int]:
    """The token ids of a text, without special tokens. A big text is tokenized in line-aligned pieces
    (one call would hold every offset of an 11 MB file in memory); `limit` stops once N tokens are read."""
    ids: list[int] = []
    start = 0
    while start < len(text) and (limit is None or len(ids) < limit):
        end = len(text) if len(text) - start <= TOKENIZE_CHARS else text.rfind("\n", start, start + TOKENIZE_CHARS) + 1
        if end <= start:  # no line break in the piece: cut anyway
            end = start + TOKENIZE_CHARS
        ids.extend(tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"])
        start = end
    return ids[:limit] if limit is not None else ids


def _instruction_examples(table, cfg: CausalLMData, tokenizer) -> list[tuple[list[int], list[int]]]:
    examples = []
    for i, row in enumerate(table.rows):
        prompt, response = row.get(cfg.prompt_field), row.get(cfg.response_field)
        for name, value in ((cfg.prompt_field, prompt), (cfg.response_field, response)):
            if not isinstance(value, str) or not value.strip():
                raise SlimtuneError(f"{table.where(i)}: instruction row without '{name}' "
                                    f"(every row needs a non-empty '{cfg.prompt_field}' and '{cfg.response_field}')")
        if cfg.clean:
            prompt, response = clean_text(prompt), clean_text(response)
        examples.append(instruction_ids(prompt, response, tokenizer))
    return examples


def prompt_text(prompt: str, tokenizer) -> str:
    """What the model sees before its answer: the chat template's user turn and assistant header, or the
    prompt and a newline for a model without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt + "\n"


def instruction_ids(prompt: str, response: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of one instruction row: the prompt's tokens masked, the response's (and EOS) learned."""
    head = tokenize_text(prompt_text(prompt, tokenizer), tokenizer)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        ids = tokenize_text(full, tokenizer)
        if ids[:len(head)] != head:  # a template whose turns do not concatenate: keep the prompt's own ids
            ids = head + tokenize_text(full[len(prompt_text(prompt, tokenizer)):], tokenizer)
    else:
        ids = head + tokenize_text(response, tokenizer)
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
    return ids, [IGNORE_INDEX] * len(head) + ids[len(head):]


# ------------------------------------------------------------------------------------ blocks, windows
def pack(stream: list[int], block_size: int) -> EncodedDataset:
    """Training blocks: consecutive `block_size` slices (a shorter tail is kept; its padding is masked)."""
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]  # one token predicts nothing
    return EncodedDataset(input_ids=blocks, labels=[0] * len(blocks))


def windows(stream: list[int], block_size: int, stride: int | None = None) -> EncodedDataset:
    """Eval windows of `block_size` tokens every `stride`; each scores only its tokens not scored before."""
    stride = stride or block_size
    inputs, labels, prev_end = [], [], 0
    for begin in range(0, len(stream), stride):
        end = min(begin + block_size, len(stream))
        ids = stream[begin:end]
        new = end - prev_end
        inputs.append(ids)
        labels.append([IGNORE_INDEX] * (len(ids) - new) + ids[len(ids) - new:])
        prev_end = end
        if end == len(stream):
            break
    return EncodedDataset(input_ids=inputs, labels=[0] * len(inputs), token_labels=labels)


def examples_dataset(examples: list[tuple[list[int], list[int]]], block_size: int) -> EncodedDataset:
    kept = [(ids[:block_size], labels[:block_size]) for ids, labels in examples]
    kept = [(ids, labels) for ids, labels in kept if any(t != IGNORE_INDEX for t in labels[1:])]
    return EncodedDataset(input_ids=[ids for ids, _ in kept], labels=[0] * len(kept),
                          token_labels=[labels for _, labels in kept])


def prepare_lm_data(cfg: CausalLMData, tokenizer, model_max: int | None = None) -> TaskData:
    """Train blocks and eval windows of a causal-LM recipe's data section."""
    if model_max is not None and cfg.block_size > model_max:
        raise SlimtuneError(f"data.block_size: {cfg.block_size} is larger than the model's context of "
                            f"{model_max} tokens")
    train = read_lm_tokens(cfg.train, cfg, tokenizer, cfg.train_tokens)
    held_back = cfg.eval is None
    evaluation = train if held_back else read_lm_tokens(cfg.eval, cfg, tokenizer, cfg.eval_tokens)
    if (train.stream is None) != (evaluation.stream is None):
        raise SlimtuneError(f"{cfg.eval}: holds {'instruction rows' if evaluation.examples else 'text'} while "
                            f"{cfg.train} holds {'instruction rows' if train.examples else 'text'}; use one kind")
    select_ds = None
    if train.stream is not None:
        train_stream, eval_stream = train.stream, evaluation.stream
        if held_back:
            cut = int(len(train.stream) * (1 - cfg.eval_fraction))
            train_stream, eval_stream = train.stream[:cut], train.stream[cut:]
        eval_stream = eval_stream[:cfg.eval_tokens] if cfg.eval_tokens else eval_stream
        if cfg.select_fraction:  # the tail of what is left: contiguous text, like the eval windows
            cut = int(len(train_stream) * (1 - cfg.select_fraction))
            train_stream, select_stream = train_stream[:cut], train_stream[cut:]
            select_ds = windows(select_stream, cfg.block_size, cfg.stride)
        train_ds, eval_ds = pack(train_stream, cfg.block_size), windows(eval_stream, cfg.block_size, cfg.stride)
    else:
        train_rows, eval_rows = train.examples, evaluation.examples
        if held_back:
            train_rows, eval_rows = _seeded_share(train_rows, cfg.eval_fraction, seed=0)
        if cfg.select_fraction:
            train_rows, select_rows = _seeded_share(train_rows, cfg.select_fraction, seed=1)
            select_ds = examples_dataset(select_rows, cfg.block_size)
        train_ds, eval_ds = examples_dataset(train_rows, cfg.block_size), examples_dataset(eval_rows, cfg.block_size)
    if select_ds is not None and not len(select_ds):
        raise SlimtuneError(f"{cfg.train}: too little training data to carve a selection split from "
                            "(data.select_fraction); give more text or set data.select_fraction: 0")
    if not len(train_ds):
        raise SlimtuneError(f"{cfg.train}: no training block of at least 2 tokens (the response of every "
                            f"instruction row may lie past block_size {cfg.block_size})")
    if not len(eval_ds):
        raise SlimtuneError(f"{cfg.eval or cfg.train}: nothing to evaluate on")
    info = {"train_file": str(cfg.train), "eval_file": str(cfg.eval) if cfg.eval else None,
            "train_blocks": len(train_ds), "train_tokens": sum(map(len, train_ds.input_ids)),
            "eval_windows": len(eval_ds), "eval_tokens": scored_tokens(eval_ds),
            "eval_source": "held back from train (its tail)" if held_back else "eval file",
            "select_tokens": scored_tokens(select_ds) if select_ds is not None else 0,
            "select_source": SELECT_SOURCE if select_ds is not None else EVAL_IS_SELECT}
    return TaskData(train=train_ds, eval=eval_ds, labels={}, info=info, select=select_ds)


def _seeded_share(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held) rows, `fraction` of them (at least one) held at random, both in file order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(order) * fraction))
    return [rows[i] for i in sorted(order[n_held:])], [rows[i] for i in sorted(order[:n_held])]


def scored_tokens(ds: EncodedDataset) -> int:
    """Tokens the loss scores in `ds` (a token needs one before it, and a label)."""
    if ds.token_labels is None:
        return sum(max(len(ids) - 1, 0) for ids in ds.input_ids)
    return sum(sum(t != IGNORE_INDEX for t in labels[1:]) for labels in ds.token_labels)


def collate_lm(ds: EncodedDataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch with `labels` per token (IGNORE_INDEX on padding and masked tokens)."""
    seqs = [ds.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (i, s) in enumerate(zip(indices, seqs, strict=True)):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
        target = s if ds.token_labels is None else ds.token_labels[i]
        labels[row, :len(s)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
