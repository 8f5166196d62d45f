"""`stage: vocabulary` — trim the model's vocabulary to the tokens the training text uses (`slimtune.vocabulary`):
the input-embedding table loses the rows of every other token and the tokenizer is rewritten to match, so a
small encoder gets much smaller (MiniLM on SST-2: 30,522 -> 13,499 rows) with no training.

Text made only of kept tokens gets the same ids, renumbered: the model's outputs on it do not change. Other
words split into smaller pieces (every single character is kept, so never into [UNK] where they were not);
the stage measures what that costs on the eval split, and how many of its texts it touches. `extra_words`
keeps the pieces of a frequency list's words as well (by default the language's 10,000 most frequent), for
text unlike the training set.

Only the train split's tokens are kept, never the selection or eval split's, so the selection split judges the
trim as new text would.

Resume: a resume past a finished vocabulary stage trims the model and the tokenizer again from the recorded
token ids; the checkpoint's weights fill the smaller table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from slimtune.config import Strict
from slimtune.errors import SlimtuneError
from slimtune.stages.base import Run, console, count_params, open_compression
from slimtune.vocabulary import check_same_tokens, kept_token_ids, trim_embeddings_, trimmed_tokenizer, wordpiece_spec
from slimtune.wordlists import extra_word_list, is_chinese

DEFAULT_WORDS = 10_000


class VocabularyConfig(Strict):
    stage: Literal["vocabulary"]
    min_count: int = Field(1, ge=1, description="keep a token the train split uses at least this many times "
                                                "(specials and single characters are always kept)")
    # the default was measured (bench/vocab_trim.py): the train split's tokens alone cost 0.6-0.9 pt on SST-2 dev
    # and TREC test, since 38-47% of their texts hold a word it splits differently; with the 10k most frequent
    # words' pieces too, 0.1-0.2 pt (within noise) for 1.3-1.8 MB more in int8
    extra_words: int | Path | None = Field(
        DEFAULT_WORDS, json_schema_extra={"ref": "file"},
        description="also keep the pieces of these words: N = the language's N most frequent words (the "
                    "wordfreq package; 0 = none), or a text file with one word per line")

    @field_validator("extra_words")
    @classmethod
    def _count_not_negative(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("a word count must be 0 or more")
        return value


@dataclass
class VocabularyState:
    """The kept token ids of the tokenizer this stage started from, in order (rebuilt on --resume)."""

    kept: list[int] = field(default_factory=list)


class Vocabulary:
    name: ClassVar[str] = "vocabulary"
    Config: ClassVar[type] = VocabularyConfig

    def __init__(self, config: VocabularyConfig):
        self.config = config
        self.noted = False  # the missing-wordfreq note, said once

    def _words(self, run: Run) -> list[str]:
        cfg = self.config
        if "extra_words" not in cfg.model_fields_set and find_spec("wordfreq") is None:
            if not self.noted:
                console.print("note: vocabulary: no frequent words kept beyond the train split's tokens: the wordfreq "
                               "package is missing (pip install 'slimtune[words]')", highlight=False)
                self.noted = True
            return []
        return extra_word_list(cfg.extra_words, is_chinese(run.data.train.texts), field="extra_words")

    def validate(self, run: Run) -> None:
        """The tokenizer must be WordPiece (a word student or a BPE model is refused) and the word list
        readable. A stage before this one that swaps the tokenizer is checked when this one runs."""
        wordpiece_spec(run.tokenizer)
        self._words(run)
        if not run.data.train.texts:
            raise SlimtuneError("vocabulary: the train split keeps no texts to read the used tokens from")

    def run(self, run: Run) -> dict:
        cfg, primary = self.config, run.task.primary.name
        start = open_compression(run, "vocabulary", snapshot=False)  # nothing trains: nothing to restart
        old = run.tokenizer
        before = len(old)
        words = self._words(run)
        kept = kept_token_ids(old, run.data.train.input_ids, min_count=cfg.min_count, words=words)
        touched = {name: _share_touched(ds.input_ids, kept)
                   for name, ds in (("eval", run.data.eval), ("select", run.data.select))}
        self._apply(run, kept)
        check_same_tokens(old, run.tokenizer, kept, run.data.train.texts[:2000])
        run.save_state(VocabularyState(kept=list(kept)))
        console.print(f"vocabulary: {before:,} -> {len(kept):,} tokens; "
                      f"{touched['eval']:.1%} of the eval texts now split some word differently")
        metric = run.primary_metric(run.model)
        return {"stage": "vocabulary", "vocab_before": before, "vocab_after": len(kept),
                "min_count": cfg.min_count, "extra_words": len(words),
                "eval_texts_resplit": round(touched["eval"], 4), "select_texts_resplit": round(touched["select"], 4),
                f"start_{primary}": start.metric, primary: metric, "params_before": start.params,
                "params_after": count_params(run.model)}

    def _apply(self, run: Run, kept: list[int]) -> None:
        tokenizer = trimmed_tokenizer(run.tokenizer, kept)
        trim_embeddings_(run.model, kept)
        run.adopt_tokenizer(tokenizer)

    def rebuild(self, run: Run) -> None:
        """On --resume past a finished vocabulary stage: trim the model and tokenizer again (weights come from
        the checkpoint)."""
        state = run.load_state(VocabularyState)
        if state is not None and state.kept and len(run.tokenizer) != len(state.kept):
            self._apply(run, state.kept)


def _share_touched(encoded: list[list[int]], kept: list[int]) -> float:
    """The share of texts holding a token the trim drops (they will be split into other pieces)."""
    keep = set(kept)
    return sum(1 for ids in encoded if not keep.issuperset(ids)) / max(len(encoded), 1)
