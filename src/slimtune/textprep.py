"""Text preprocessing: the cleaning and Chinese word segmentation applied before tokenization.

This module depends on the standard library only (jieba is imported when Chinese segmentation is on),
so `slimtune export` ships it verbatim beside the ONNX graph as `preprocess.py`: a server with
onnxruntime and tokenizers alone treats text exactly as training did, from the `preprocessing.json`
record written next to it:

    from preprocess import preprocessor_from_record
    preprocess = preprocessor_from_record("OUT/preprocessing.json")
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
# A letter must follow '<': "a < b and c > d" is a comparison, not a tag.
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, lowercase: bool = False) -> str:
    """Undo HTML (entities, tags, script/style bodies), drop control and invisible format characters,
    NFKC-normalise (full-width "ＡＢＣ１" -> "ABC1", ligatures), collapse whitespace."""
    text = html.unescape(text)
    text = _SCRIPT_OR_STYLE.sub(" ", text)
    text = _TAG.sub(" ", text)  # a space, not nothing: "line<br/>break" is two words
    text = _drop_invisible(text)
    text = unicodedata.normalize("NFKC", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


def _drop_invisible(text: str) -> str:
    if text.isprintable():  # fast path: no control (Cc) or format (Cf) characters at all
        return text
    return "".join(_visible(ch) for ch in text)


def _visible(ch: str) -> str:
    category = unicodedata.category(ch)
    if category == "Cc":  # tabs and newlines separate words; other control characters are noise
        return " " if ch.isspace() else ""
    if category == "Cf":  # zero-width spaces/joiners, BOM, soft hyphen, bidi marks
        return ""
    return ch


# Han ideographs (CJK Unified + Extension A, compatibility ideographs, Extensions B and later)
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")


def segment_chinese(text: str) -> str:
    """Put spaces between the words of Chinese runs (jieba); everything else is kept as it is."""
    if not _CJK_RUN.search(text):
        return text
    jieba = jieba_module()
    return _CJK_RUN.sub(lambda run: " ".join(jieba.lcut(run.group())), text)


@functools.cache
def jieba_module():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # otherwise it logs "Building prefix dict..." to stderr
    return jieba


def make_preprocessor(clean: bool, lowercase: bool, chinese: bool) -> Callable[[str], str]:
    def preprocess(text: str) -> str:
        if clean:
            text = clean_text(text, lowercase=lowercase)
        elif lowercase:
            text = text.lower()
        return segment_chinese(text) if chinese else text

    return preprocess


def preprocessor_from_record(record: dict | str | Path) -> Callable[[str], str]:
    """The text function of a preprocessing record (a dict, or the path of an export's preprocessing.json)."""
    if not isinstance(record, dict):
        record = json.loads(Path(record).read_text(encoding="utf-8"))
    return make_preprocessor(bool(record.get("clean", True)), bool(record.get("lowercase", False)),
                             bool(record.get("segment_chinese", False)))
