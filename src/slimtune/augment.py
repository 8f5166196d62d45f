"""EDA-style text augmentation (Wei & Zou 2019): synonym replacement, random insertion, random swap
and random deletion; and n-gram sampling (Tang et al. 2019), which turns a sentence into one of its
phrases, as SST's phrase-level training set does with parse trees: a teacher labelling such phrases
teaches a small student what each part of a sentence contributes.

Written by hand rather than with nlpaug or WordNet because those need downloads (NLTK corpora, word
vectors) and slimtune runs offline. Synonyms are the nearest neighbours of a word in the model's own
word-embedding table, so they cost nothing extra and exist in any language the vocabulary covers.
Caveat: embedding neighbours are "used in similar contexts", which includes antonyms (good -> bad).

Each augmented copy applies ONE operation, as in the EDA reference code: for every example the
enabled operations are shuffled and the copies cycle through them, so four copies with all four
operations enabled use each operation once. One change per copy keeps copies close to the original.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimtune.config import AugmentConfig
from slimtune.errors import SlimtuneError

# Function words carry little meaning, and their embedding neighbours are other function words or
# punctuation, so synonym replacement leaves them alone. Harmless for non-English text.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split())

WORD_PUNCTUATION = "'-’"  # allowed inside a candidate word (don't, well-known)
MAX_INSERT_TRIES = 10  # random words tried to find one with synonyms, as in the EDA reference


# ------------------------------------------------------------------------------------ vocabulary
def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2, RoBERTa) spells each byte as a printable char; this maps it back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(extra), extra + 1
    return {c: b for b, c in chars.items()}


def _word_start_marker(vocab: dict[str, int]) -> str | None:
    """'▁' for SentencePiece, 'Ġ' for byte-level BPE, None for WordPiece (which marks '##' instead)."""
    for marker in ("▁", "Ġ"):
        if sum(piece.startswith(marker) for piece in vocab) > len(vocab) // 10:
            return marker
    return None


def _piece_to_word(piece: str, marker: str | None, byte_decoder: dict[str, int]) -> str | None:
    """The word a vocab piece spells, or None when the piece does not start a word."""
    if marker is None:
        return None if piece.startswith("##") else piece
    if not piece.startswith(marker) or len(piece) == 1:
        return None  # a piece without the marker continues a word
    word = piece[1:]
    if marker == "Ġ":
        try:
            word = bytes(byte_decoder[c] for c in word).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None  # half of a multi-byte character
    return word


def is_candidate_word(word: str) -> bool:
    """Letters (and combining marks, for scripts such as Devanagari), with inner ' or -.

    Rejects punctuation, digits, `[unused0]`-style entries and single latin letters.
    """
    if not word or (len(word) == 1 and word.isascii()):
        return False
    if not (_is_letter(word[0]) and (_is_letter(word[-1]) or _is_mark(word[-1]))):
        return False
    return all(_is_letter(c) or _is_mark(c) or c in WORD_PUNCTUATION for c in word)


def _is_letter(char: str) -> bool:
    return unicodedata.category(char).startswith("L")


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def candidate_vocab(tokenizer, n_rows: int) -> tuple[list[str], list[int]]:
    """Whole-word vocab entries usable as synonyms -> (words, embedding row ids), first id wins."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    marker, byte_decoder = _word_start_marker(vocab), _gpt2_byte_decoder()
    words: list[str] = []
    ids: list[int] = []
    seen: set[str] = set()
    for piece, idx in sorted(vocab.items(), key=lambda item: item[1]):
        if idx >= n_rows or piece in special:
            continue  # added tokens beyond the embedding table have no row
        word = _piece_to_word(piece, marker, byte_decoder)
        if word is None or word in seen or not is_candidate_word(word):
            continue
        seen.add(word)
        words.append(word)
        ids.append(idx)
    return words, ids


def is_uncased(tokenizer) -> bool:
    lower = tokenizer.init_kwargs.get("do_lower_case")
    if lower is not None:
        return bool(lower)
    return tokenizer.tokenize("A") == tokenizer.tokenize("a")


# -------------------------------------------------------------------------------------- synonyms
class EmbeddingSynonyms:
    """Synonyms = cosine nearest neighbours among the whole-word rows of a word-embedding table."""

    def __init__(self, tokenizer, embedding_weight: torch.Tensor, k: int = 10, min_similarity: float = 0.5,
                 cache_size: int = 50_000):
        self.k, self.min_similarity, self.cache_size = k, min_similarity, cache_size
        self.lowercase = is_uncased(tokenizer)
        self.words, ids = candidate_vocab(tokenizer, embedding_weight.shape[0])
        if not self.words:
            raise SlimtuneError("augment: the tokenizer vocabulary has no whole-word entries to use as synonyms")
        self._index = {word: i for i, word in enumerate(self.words)}
        with torch.no_grad():
            rows = embedding_weight.detach()[torch.tensor(ids)].float()
            self._unit_rows = F.normalize(rows, dim=1)  # unit rows: a dot product is the cosine
        self._cache: dict[str, tuple[str, ...]] = {}  # insertion order doubles as LRU order

    def synonyms(self, word: str) -> list[str]:
        """Up to k neighbours, best first; [] if the word is not a single whole-word vocab entry."""
        key = word.lower() if self.lowercase else word
        found = self._cache.pop(key, None)
        if found is None:
            found = self._nearest(key)
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # least recently used
        self._cache[key] = found  # (re)insert at the most-recent end
        return list(found)

    def _nearest(self, key: str) -> tuple[str, ...]:
        idx = self._index.get(key)
        if idx is None:
            return ()
        with torch.no_grad():
            similarity = self._unit_rows @ self._unit_rows[idx]
            # Over-fetch: the word itself and its case variants are dropped below.
            top = torch.topk(similarity, min(len(self.words), 4 * self.k + 8))
        found: list[str] = []
        seen = {key.casefold()}
        for score, j in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if score < self.min_similarity or len(found) == self.k:
                break
            variant = self.words[j].casefold()
            if variant not in seen:  # "Good" is no synonym of "good"; "goods" may stay
                seen.add(variant)
                found.append(self.words[j])
        return tuple(found)


# ------------------------------------------------------------------------------------ operations
def _split_affixes(token: str) -> tuple[str, str, str]:
    """'(great),' -> ('(', 'great', '),'): punctuation glued to a word is not part of it."""
    start, end = 0, len(token)
    while start < end and _is_punctuation(token[start]):
        start += 1
    while end > start and _is_punctuation(token[end - 1]):
        end -= 1
    return token[:start], token[start:end], token[end:]


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def _match_case(original: str, replacement: str) -> str:
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _content_words(words: list[str]) -> list[str]:
    """Distinct non-stop words of the text, punctuation stripped, in order of appearance."""
    cores = (_split_affixes(w)[1] for w in words)
    return list(dict.fromkeys(c for c in cores if c and c.lower() not in STOP_WORDS))


def _n_changes(p: float, n_words: int) -> int:
    return max(1, int(p * n_words))  # EDA's alpha: at least one change when enabled


def synonym_replacement(words: list[str], rng: random.Random, cfg: AugmentConfig,
                        synonyms: EmbeddingSynonyms) -> list[str]:
    """Replace up to n distinct content words (every occurrence) with a random synonym."""
    new = list(words)
    targets = _content_words(words)
    rng.shuffle(targets)
    replaced = 0
    for target in targets:
        if replaced == _n_changes(cfg.p_synonym, len(words)):
            break
        options = synonyms.synonyms(target)
        if options:
            new = _replace_word(new, target, rng.choice(options))
            replaced += 1
    return new


def _replace_word(words: list[str], target: str, synonym: str) -> list[str]:
    new = []
    for token in words:
        prefix, core, suffix = _split_affixes(token)
        new.append(prefix + _match_case(core, synonym) + suffix if core == target else token)
    return new


def random_insertion(words: list[str], rng: random.Random, cfg: AugmentConfig,
                     synonyms: EmbeddingSynonyms) -> list[str]:
    """Insert n times a synonym of a random content word at a random position."""
    new = list(words)
    sources = _content_words(words)
    for _ in range(_n_changes(cfg.p_insert, len(words))):
        options = _synonyms_of_random_word(sources, rng, synonyms)
        if not options:
            break
        new.insert(rng.randint(0, len(new)), rng.choice(options))
    return new


def _synonyms_of_random_word(sources: list[str], rng: random.Random, synonyms: EmbeddingSynonyms) -> list[str]:
    for _ in range(MAX_INSERT_TRIES if sources else 0):
        options = synonyms.synonyms(rng.choice(sources))
        if options:
            return options
    return []


def random_swap(words: list[str], rng: random.Random, cfg: AugmentConfig, synonyms=None) -> list[str]:
    """Swap two random positions, n times."""
    new = list(words)
    if len(new) < 2:
        return new
    for _ in range(_n_changes(cfg.p_swap, len(words))):
        i, j = rng.sample(range(len(new)), 2)
        new[i], new[j] = new[j], new[i]
    return new


def random_deletion(words: list[str], rng: random.Random, cfg: AugmentConfig, synonyms=None) -> list[str]:
    """Drop each word with probability p_delete; never everything (then keep one random word)."""
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.random() >= cfg.p_delete]
    return kept or [rng.choice(words)]


def random_span(words: list[str], rng: random.Random, cfg: AugmentConfig, synonyms=None) -> list[str]:
    """A random contiguous span of 1 .. p_span * n words (never the whole text when it has two or more)."""
    if len(words) == 1:
        return list(words)
    longest = min(len(words) - 1, max(1, round(cfg.p_span * len(words))))
    length = rng.randint(1, longest)
    start = rng.randint(0, len(words) - length)
    return words[start:start + length]


Operation = Callable[[list[str], random.Random, AugmentConfig, EmbeddingSynonyms | None], list[str]]
OPERATIONS: dict[str, tuple[Operation, str, bool]] = {  # name -> (function, probability field, needs synonyms)
    "synonym": (synonym_replacement, "p_synonym", True),
    "insert": (random_insertion, "p_insert", True),
    "swap": (random_swap, "p_swap", False),
    "delete": (random_deletion, "p_delete", False),
    "span": (random_span, "p_span", False),
}


def enabled_operations(cfg: AugmentConfig, synonyms: EmbeddingSynonyms | None) -> list[str]:
    """Operations with p > 0, minus the synonym-based ones when there are no synonyms."""
    return [name for name, (_, p_field, needs_synonyms) in OPERATIONS.items()
            if getattr(cfg, p_field) > 0 and (synonyms is not None or not needs_synonyms)]


# ------------------------------------------------------------------------------------------- api
def eda(text: str, rng: random.Random, cfg: AugmentConfig, synonyms: EmbeddingSynonyms | None,
        operation: str | None = None) -> str:
    """One augmented copy of `text`: `operation`, or one enabled operation chosen at random.

    Words are whitespace-separated, so unsegmented Chinese is a single word (segment with jieba
    first); the text comes back unchanged when no operation is enabled or it has no words.
    """
    enabled = enabled_operations(cfg, synonyms)
    words = text.split()
    if not words or not enabled:
        return text
    function = OPERATIONS[operation or rng.choice(enabled)][0]
    return " ".join(function(words, rng, cfg, synonyms))


def augment_texts(texts: list[str], labels: list[int], cfg: AugmentConfig, synonyms: EmbeddingSynonyms | None,
                  pairs: list[str] | None = None) -> tuple[list[str], list[int], list[str] | None]:
    """The originals, then cfg.copies augmented copies of each example in turn (example 0's copies,
    example 1's, ...). Labels and pairs (never augmented) are repeated to match. Deterministic for a
    given cfg.seed; a copy may equal its original (e.g. nothing had a synonym).
    """
    if len(labels) != len(texts) or (pairs is not None and len(pairs) != len(texts)):
        raise ValueError(f"augment_texts: {len(texts)} texts, {len(labels)} labels, "
                         f"{'no' if pairs is None else len(pairs)} pairs")
    rng = random.Random(cfg.seed)
    enabled = enabled_operations(cfg, synonyms)
    out_texts, out_labels = list(texts), list(labels)
    out_pairs = None if pairs is None else list(pairs)
    for i, text in enumerate(texts):
        order = rng.sample(enabled, len(enabled))  # balanced: copies cycle through a shuffled order
        for copy in range(cfg.copies):
            operation = order[copy % len(order)] if order else None
            out_texts.append(eda(text, rng, cfg, synonyms, operation))
            out_labels.append(labels[i])
            if out_pairs is not None:
                out_pairs.append(pairs[i])
    return out_texts, out_labels, out_pairs
