"""Word-level classifiers (the distillation stage's word students): a vocabulary of whole words, and a
BiLSTM or CNN on it. This module defines and loads them; `slimtune.distill.wordlevel` builds them from a
teacher.

Tang et al. 2019 ("Distilling task-specific knowledge from BERT into simple neural networks"): a
one-layer BiLSTM over word embeddings, trained on the teacher's logits, keeps most of BERT's accuracy
at a fraction of its latency. The tokenizer and models mimic the HF surface slimtune uses (tokenizer
call -> input_ids, `model(**batch).logits`, `config.id2label`, `save_pretrained`), so encoding,
training, evaluation and prediction work on them unchanged.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from slimtune.errors import SlimtuneError
from slimtune.textprep import jieba_module

FORMAT = "word-classifier"
VOCAB_FILE = "word_vocab.json"
WEIGHTS_FILE = "model.safetensors"
SPECIALS = ("[PAD]", "[UNK]", "[SEP]")
PAD_ID, UNK_ID, SEP_ID = 0, 1, 2
_WORD_RE = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark on its own


# ---------------------------------------------------------------------------------------- tokenizer
class WordTokenizer:
    """Whole words -> ids. Unknown words map to [UNK]; an empty text still gives one id ([UNK])."""

    pad_token, unk_token, sep_token = SPECIALS
    pad_token_id, unk_token_id, sep_token_id = PAD_ID, UNK_ID, SEP_ID
    all_special_tokens = list(SPECIALS)

    def __init__(self, words: Sequence[str], lowercase: bool = True, chinese: bool = False):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise SlimtuneError(f"word vocabulary must start with {', '.join(SPECIALS)}")
        self.words = list(words)  # index = id
        self.vocab = {w: i for i, w in enumerate(self.words)}
        self.lowercase, self.chinese = lowercase, chinese

    @classmethod
    def build(cls, texts: Iterable[str], max_vocab: int = 30000, min_freq: int = 1, lowercase: bool = True,
              chinese: bool = False, extra_words: Iterable[str] = ()) -> WordTokenizer:
        """The `max_vocab` (specials included) most frequent words of the texts; ties alphabetical, so it is
        deterministic. `extra_words` not among them come after them (alphabetical), all of them."""
        tok = cls(SPECIALS, lowercase, chinese)
        counts = Counter(w for text in texts for w in tok.tokenize(text))
        ranked = sorted((w for w, n in counts.items() if n >= min_freq and w not in tok.vocab),
                        key=lambda w: (-counts[w], w))
        ranked = ranked[: max(0, max_vocab - len(SPECIALS))]
        # only what the tokenizer can ever produce ("don't" is split into three words: never looked up)
        extra = {w.lower() if lowercase else w for w in extra_words if _WORD_RE.fullmatch(w)}
        extra = sorted(extra - set(ranked) - set(SPECIALS))
        return cls([*SPECIALS, *ranked, *extra], lowercase, chinese)

    def tokenize(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        if self.chinese:
            return [w for piece in jieba_module().lcut(text) for w in _WORD_RE.findall(piece)]
        return _WORD_RE.findall(text)

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.get(w, UNK_ID) for w in self.tokenize(text)] or [UNK_ID]

    def encode_one(self, text: str, pair: str | None = None, max_length: int | None = None) -> list[int]:
        ids = self._ids(text)
        if pair is not None:
            second = self._ids(pair)
            if max_length:  # HF's "longest_first": trim the longer side, keep one word of each
                while len(ids) + len(second) > max_length - 1 and max(len(ids), len(second)) > 1:
                    (ids if len(ids) >= len(second) else second).pop()
            ids = [*ids, SEP_ID, *second]
        return ids[: max(1, max_length)] if max_length else ids

    def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None, truncation=True,
                 max_length: int | None = None, padding=False, return_tensors: str | None = None, **_) -> dict:
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        pairs = [pairs] if isinstance(pairs, str) else pairs
        limit = max_length if truncation else None
        ids = [self.encode_one(t, None if pairs is None else pairs[i], limit) for i, t in enumerate(texts)]
        if padding and padding != "do_not_pad":  # True / "longest": pad to the longest in this call
            width = max(map(len, ids))
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
            ids = [x + [PAD_ID] * (width - len(x)) for x in ids]
        else:
            mask = [[1] * len(x) for x in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    @property
    def init_kwargs(self) -> dict:
        return {"do_lower_case": self.lowercase}  # what augment.is_uncased reads on HF tokenizers

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def save_pretrained(self, out_dir: str | Path, **_) -> tuple[str]:
        path = Path(out_dir) / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"lowercase": self.lowercase, "chinese": self.chinese, "words": self.words}
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return (str(path),)

    @classmethod
    def from_pretrained(cls, path: str | Path, **_) -> WordTokenizer:
        file = Path(path) / VOCAB_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            return cls(data["words"], bool(data["lowercase"]), bool(data["chinese"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SlimtuneError(f"{file}: not a valid word vocabulary ({e})") from None


# ------------------------------------------------------------------------------------------- models
TABLE_STORAGES = ("float32", "float16", "int8")
LSTM_KERNELS = ("float32", "int8")


def word_config(arch: str, vocab_size: int, id2label: dict[int, str], label2id: dict[str, int] | None = None, *,
                embed_dim: int = 300, hidden: int = 256, num_layers: int = 1,
                kernel_sizes: Sequence[int] = (3, 4, 5), dropout: float = 0.2,
                table: str = "float32", lstm: str = "float32") -> PretrainedConfig:
    if arch not in WORD_ARCHS:
        raise SlimtuneError(f"word student arch '{arch}': expected one of {', '.join(WORD_ARCHS)}")
    if table not in TABLE_STORAGES:
        raise SlimtuneError(f"word student table {table!r}: expected one of {', '.join(TABLE_STORAGES)}")
    if lstm not in LSTM_KERNELS or (lstm != "float32" and arch != "bilstm"):
        raise SlimtuneError(f"word student lstm {lstm!r}: expected float32, or int8 for a bilstm")
    id2label = {int(i): str(name) for i, name in id2label.items()}
    label2id = label2id or {name: i for i, name in id2label.items()}
    return PretrainedConfig(arch=arch, vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden,
                            num_layers=num_layers, kernel_sizes=list(kernel_sizes), dropout=dropout,
                            id2label=id2label, label2id=label2id, slimtune_format=FORMAT, table=table,
                            lstm=lstm)


class CompactEmbedding(nn.Module):
    """A fixed word-vector table stored small: float16, or int8 codes with one scale per row (symmetric,
    the row's largest magnitude maps to 127). A word student's table is nearly all of its size (99k
    words x 768 = 76M of a BiLSTM's 78M parameters); only the looked-up rows are widened to float32, so
    the forward pass costs no more than a float table's. Not trainable: convert after training, or build
    it directly for a frozen table. The codes are named `qweight` so `slimtune pack` entropy-codes them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, storage: str):
        super().__init__()
        if storage not in TABLE_STORAGES[1:]:
            raise SlimtuneError(f"table storage {storage!r}: expected float16 or int8")
        self.num_embeddings, self.embedding_dim, self.storage = num_embeddings, embedding_dim, storage
        dtype = torch.int8 if storage == "int8" else torch.float16
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=dtype))
        if storage == "int8":
            self.register_buffer("scales", torch.zeros(num_embeddings, 1))

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, storage: str) -> CompactEmbedding:
        table = cls(weight.shape[0], weight.shape[1], storage)
        weight = weight.detach().float()
        if storage == "float16":
            table.qweight.copy_(weight.half())
        else:
            table.scales.copy_(weight.abs().amax(1, keepdim=True) / 127)
            table.qweight.copy_((weight / table.scales.clamp(min=1e-12)).round().clamp(-127, 127).to(torch.int8))
        return table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.qweight).float()
        return rows * F.embedding(input_ids, self.scales) if self.storage == "int8" else rows

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in float32 (for code that reads a table: synonym augmentation, PCA...)."""
        return self.qweight.float() * self.scales if self.storage == "int8" else self.qweight.float()


def compact_table_(model: nn.Module, storage: str) -> None:
    """Store a word classifier's table as `storage` in place (its config records it, so it saves and
    loads that way)."""
    if storage == getattr(model.config, "table", "float32"):
        return
    if storage == "float32":
        raise SlimtuneError("a compact word table cannot be widened back to float32")
    model.embeddings = CompactEmbedding.from_float(model.embeddings.weight, storage)
    model.config.table = storage


class _WordClassifierParts:
    """What both archs share (embedding -> features -> dropout -> linear, saving). A mixin, not a base module."""

    config: PretrainedConfig

    def _init_parts(self, config: PretrainedConfig, n_features: int) -> None:
        self.config = config
        table = getattr(config, "table", "float32")  # saved before tables could be compact: float32
        self.embeddings = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD_ID) \
            if table == "float32" else CompactEmbedding(config.vocab_size, config.embed_dim, table)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(n_features, config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, **_) -> SequenceClassifierOutput:
        mask = (input_ids != PAD_ID) if attention_mask is None else attention_mask.bool()
        mask = mask.clone()
        mask[:, 0] = True  # an all-padding row still pools over one position instead of none
        # Zeroed padding: what a sentence sees is the same alone or inside a padded batch.
        emb = self.embeddings(input_ids) * mask.unsqueeze(-1)
        states = self.states(emb, mask)
        logits = self.classifier(self.dropout(self.features(states[-1], mask)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        # like an HF encoder's: per-position states, 0 = the word vectors (what intermediate losses match)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=states if output_hidden_states else None)

    def get_input_embeddings(self) -> nn.Embedding | CompactEmbedding:
        return self.embeddings

    def save_pretrained(self, out_dir: str | Path, safe_serialization: bool = True, **_) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.slimtune_format = FORMAT
        self.config.to_json_file(out / "config.json")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def int8_lstm(lstm: nn.LSTM) -> nn.Module:
    """`lstm` on torch's dynamic-int8 LSTM kernels (int8 weights, one symmetric scale per matrix; each step's
    activations quantized on the fly): 2.3x a float LSTM's batch-32 throughput for the SST-2 BiLSTM student
    at 0.1 pt lower mean accuracy over 3 seeds (docs/benchmarks.md). ONNX Runtime has no packed-sequence
    LSTM to ship instead; these kernels live in torch.ao, whose creation functions warn that they are moving
    to torchao, which has no LSTM: the warning is silenced, and torch is pinned."""
    from torch.ao.nn.quantized.dynamic import LSTM as DynamicInt8LSTM
    from torch.ao.quantization import default_dynamic_qconfig

    float_copy = copy.deepcopy(lstm)
    float_copy.qconfig = default_dynamic_qconfig
    # the int8 module draws random placeholder weights before it takes these: without fork_rng, every
    # selection-split evaluation would move the training's random state (its dropout masks, its batch order)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        return DynamicInt8LSTM.from_float(float_copy)


def _forget_int8_lstm(model: nn.Module, *_) -> None:
    """Drop a BiLSTM's int8 copy of its LSTM (also a load_state_dict post-hook: it returns nothing)."""
    model.__dict__.pop("_int8_lstm", None)


class WordBiLSTMClassifier(_WordClassifierParts, nn.Module):
    """Embedding -> BiLSTM (packed, so padding never enters it) -> [max-pool; mean-pool] -> linear. With
    `config.lstm == "int8"`, inference (eval mode) runs an int8 copy of the LSTM (`int8_lstm`), made from the
    float weights after they may have changed; training and the saved weights stay float."""

    LAYERS = 1  # hidden states after the word vectors: the BiLSTM's outputs

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self._init_parts(config, 4 * config.hidden)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden, num_layers=config.num_layers, batch_first=True,
                            bidirectional=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.register_load_state_dict_post_hook(_forget_int8_lstm)

    def train(self, mode: bool = True) -> WordBiLSTMClassifier:
        # weights change in training mode, and the fused AdamW changes them without bumping the tensors'
        # versions: the int8 copy is remade at the first forward after every switch
        _forget_int8_lstm(self)
        return super().train(mode)

    def state_widths(self) -> list[int]:
        """Width of each of `hidden_states`: the word vectors, the BiLSTM's outputs."""
        return [self.config.embed_dim, 2 * self.config.hidden]

    def states(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        packed = pack_padded_sequence(emb, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
        lstm = self.inference_lstm() if not self.training else self.lstm
        out, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=emb.size(1))
        return emb, out

    def inference_lstm(self) -> nn.Module:
        """The LSTM eval mode runs: the float one, or its int8 copy, remade after a switch of mode, a load,
        or an in-place edit of a weight (which bumps its version)."""
        if getattr(self.config, "lstm", "float32") != "int8" or self.lstm.weight_ih_l0.device.type != "cpu":
            return self.lstm  # the int8 kernels are CPU kernels: on a GPU the float LSTM runs
        key = tuple((p.data_ptr(), p._version) for p in self.lstm.parameters())
        cached = self.__dict__.get("_int8_lstm")  # a plain attribute: not a submodule, never in state_dict
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
                cached = (key, int8_lstm(self.lstm))
            self.__dict__["_int8_lstm"] = cached
        return cached[1]

    def features(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1)
        max_pool = out.masked_fill(~keep, float("-inf")).amax(1)
        mean_pool = (out * keep).sum(1) / mask.sum(1, keepdim=True).to(out.dtype)
        return torch.cat([max_pool, mean_pool], dim=-1)


class WordCNNClassifier(_WordClassifierParts, nn.Module):
    """Embedding -> Conv1d per kernel size -> ReLU -> max-pool over the windows inside the text -> linear."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self._init_parts(config, config.hidden * len(config.kernel_sizes))
        self.convs = nn.ModuleList(nn.Conv1d(config.embed_dim, config.hidden, k) for k in config.kernel_sizes)

    LAYERS = 0  # only the word vectors: the convolutions' windows are not per-word states

    def state_widths(self) -> list[int]:
        return [self.config.embed_dim]

    def states(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (emb,)

    def features(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = emb.transpose(1, 2)  # (batch, embed, time)
        widest = max(self.config.kernel_sizes)
        if x.size(2) < widest:  # texts shorter than a kernel: zero-pad (zero = a padding embedding)
            x = F.pad(x, (0, widest - x.size(2)))
        lengths = mask.sum(1, keepdim=True)
        pooled = []
        for conv in self.convs:
            k = conv.kernel_size[0]
            h = torch.relu(conv(x))
            # Only windows starting inside the text (at least the first one) are pooled.
            starts = torch.arange(h.size(2), device=h.device).unsqueeze(0)
            inside = starts < (lengths - k + 1).clamp(min=1)
            pooled.append(h.masked_fill(~inside.unsqueeze(1), float("-inf")).amax(2))
        return torch.cat(pooled, dim=-1)


WORD_ARCHS: dict[str, type[nn.Module]] = {"bilstm": WordBiLSTMClassifier, "cnn": WordCNNClassifier}


def load_word_classifier(path: str | Path) -> nn.Module:
    """A saved word classifier (config.json + model.safetensors; never pickle)."""
    path = Path(path)
    try:
        config = PretrainedConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{path / 'config.json'}: not a readable word classifier config ({e})") from None
    arch = getattr(config, "arch", None)
    if arch not in WORD_ARCHS:
        raise SlimtuneError(f"{path / 'config.json'}: unknown word classifier arch '{arch}'")
    if not (path / WEIGHTS_FILE).is_file():
        raise SlimtuneError(f"{path}: no {WEIGHTS_FILE}")
    model = WORD_ARCHS[arch](config)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model
