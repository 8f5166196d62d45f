"""EDA augmentation with synonyms from MiniLM's real word-embedding table."""

import random

import pytest

from slimtune.augment import (
    EmbeddingSynonyms,
    augment_texts,
    candidate_vocab,
    eda,
    is_candidate_word,
    random_deletion,
    random_span,
    random_swap,
)
from slimtune.config import AugmentConfig

TEXTS = [
    "a stirring , funny and finally transporting re-imagining of beauty and the beast",
    "apparently reassembled from the cutting-room floor of any given daytime soap .",
    "it is a good movie with a terrible ending",
]
LABELS = [1, 0, 1]
NO_OPS = dict(p_synonym=0, p_insert=0, p_swap=0, p_delete=0)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    weights = load_file(f"{minilm_path}/model.safetensors")
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    return AutoTokenizer.from_pretrained(minilm_path), weights[key]


@pytest.fixture(scope="module")
def synonyms(minilm):
    tokenizer, weight = minilm
    return EmbeddingSynonyms(tokenizer, weight, k=10, min_similarity=0.3)


def test_synonyms_of_good_are_sensible_neighbours(synonyms):
    found = synonyms.synonyms("good")
    print("synonyms('good') =", found)  # embedding neighbours include antonyms such as 'bad'
    assert {"great", "excellent", "nice", "bad"} & set(found)
    assert "good" not in found and len(found) <= 10
    assert synonyms.synonyms("Good") == found  # MiniLM is uncased


def test_synonyms_are_whole_words_only(synonyms):
    found = [w for word in ("good", "movie", "story", "the") for w in synonyms.synonyms(word)]
    assert found
    assert not any(w.startswith("##") or w.startswith("[") for w in found)
    assert all(is_candidate_word(w) for w in found)


def test_synonyms_empty_for_pieces_specials_and_unknown_words(synonyms):
    for word in ("##ing", "[CLS]", "[unused0]", "a", "42", "xyzzyq", ""):
        assert synonyms.synonyms(word) == []


def test_candidate_vocab_excludes_pieces_specials_and_punctuation(minilm):
    tokenizer, weight = minilm
    words, ids = candidate_vocab(tokenizer, weight.shape[0])
    assert len(words) == len(ids) and "movie" in words
    assert not {"[CLS]", "[PAD]", "[unused0]", "##ing", ",", "1990", "a", "b"} & set(words)


def test_min_similarity_filters_neighbours(minilm):
    tokenizer, weight = minilm
    strict = EmbeddingSynonyms(tokenizer, weight, k=10, min_similarity=0.99)
    assert strict.synonyms("good") == []


def test_cache_stays_bounded(minilm):
    tokenizer, weight = minilm
    small = EmbeddingSynonyms(tokenizer, weight, k=3, cache_size=2)
    for word in ("good", "movie", "story", "good"):
        small.synonyms(word)
    assert list(small._cache) == ["story", "good"]


def test_same_seed_same_copies_other_seed_differs(synonyms):
    first = augment_texts(TEXTS, LABELS, AugmentConfig(seed=1), synonyms)
    again = augment_texts(TEXTS, LABELS, AugmentConfig(seed=1), synonyms)
    other = augment_texts(TEXTS, LABELS, AugmentConfig(seed=2), synonyms)
    assert first == again
    assert first[0] != other[0]


def test_copies_follow_originals_with_aligned_labels_and_pairs(synonyms):
    pairs = ["p0", "p1", "p2"]
    texts, labels, out_pairs = augment_texts(TEXTS, LABELS, AugmentConfig(copies=4), synonyms, pairs=pairs)
    assert len(texts) == len(labels) == len(out_pairs) == 3 * 5
    assert texts[:3] == TEXTS and labels[:3] == LABELS and out_pairs[:3] == pairs
    assert labels[3:] == [1] * 4 + [0] * 4 + [1] * 4
    assert out_pairs[3:] == ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4


def test_zero_copies_and_no_pairs(synonyms):
    assert augment_texts(TEXTS, LABELS, AugmentConfig(copies=0), synonyms) == (TEXTS, LABELS, None)


def test_all_probabilities_zero_returns_originals(synonyms):
    texts, _, _ = augment_texts(TEXTS, LABELS, AugmentConfig(copies=2, **NO_OPS), synonyms)
    assert texts == TEXTS + [t for t in TEXTS for _ in range(2)]


def test_without_synonyms_only_swap_and_delete_run():
    cfg = AugmentConfig(copies=3, p_swap=0, p_delete=0)  # only the synonym-based operations enabled
    texts, _, _ = augment_texts(TEXTS, LABELS, cfg, None)
    assert texts[3:] == [t for t in TEXTS for _ in range(3)]


def test_four_copies_use_each_operation_once(synonyms):
    text = "one two three four five six seven eight nine ten"
    texts, _, _ = augment_texts([text], [0], AugmentConfig(copies=4, p_delete=0.3, seed=3), synonyms)
    lengths = sorted(len(t.split()) for t in texts[1:])
    assert lengths[0] < 10 and lengths[-1] > 10  # a deletion and an insertion among the copies


def test_synonym_replacement_keeps_punctuation_and_case(synonyms):
    cfg = AugmentConfig(p_synonym=1.0)
    out = eda("Terrible!", random.Random(0), cfg, synonyms, "synonym")
    assert out.endswith("!") and out[0].isupper() and out != "Terrible!"


def test_synonym_replacement_skips_stop_words(synonyms):
    assert eda("the and of", random.Random(0), AugmentConfig(p_synonym=1.0), synonyms, "synonym") == "the and of"


def test_deletion_never_empties():
    rng, cfg = random.Random(0), AugmentConfig(p_delete=1.0)
    for _ in range(20):
        assert len(random_deletion(["just", "two"], rng, cfg)) == 1
    assert eda("alone", rng, cfg, None, "delete") == "alone"


def test_span_is_a_contiguous_phrase_no_longer_than_p_span():
    words = "one two three four five six seven eight nine ten".split()
    rng, seen = random.Random(0), set()
    for _ in range(200):
        span = random_span(words, rng, AugmentConfig(p_span=0.3))
        start = words.index(span[0])
        assert span == words[start:start + len(span)] and 1 <= len(span) <= 3
        seen.add(len(span))
    assert seen == {1, 2, 3}  # every allowed length occurs
    long = {len(random_span(words, rng, AugmentConfig(p_span=1.0))) for _ in range(300)}
    assert max(long) == 9  # never the whole text
    assert random_span(["alone"], rng, AugmentConfig(p_span=1.0)) == ["alone"]


def test_span_only_copies_are_phrases_of_their_original():
    cfg = AugmentConfig(copies=3, **NO_OPS, p_span=0.5)
    out, labels, _ = augment_texts(TEXTS, LABELS, cfg, None)
    assert len(out) == 12 and labels[3:] == [1] * 3 + [0] * 3 + [1] * 3
    for i, text in enumerate(TEXTS):
        for copy in out[3 + 3 * i: 6 + 3 * i]:
            assert copy in text and len(copy.split()) <= round(0.5 * len(text.split()))


def test_swap_keeps_the_words():
    words = "one two three four five".split()
    swapped = random_swap(words, random.Random(0), AugmentConfig(p_swap=0.5))
    assert sorted(swapped) == sorted(words)


def test_cjk_and_empty_text_do_not_crash(synonyms):
    texts = ["这部电影很好", "这部 电影 很 好", "", "   "]
    out, labels, _ = augment_texts(texts, [1, 1, 0, 0], AugmentConfig(copies=4), synonyms)
    assert len(out) == 20 and labels[4:8] == [1] * 4
    assert out[4:8] == ["这部电影很好"] * 4  # one unsegmented "word": nothing to change
    assert all(t == "" for t in out[12:16])
