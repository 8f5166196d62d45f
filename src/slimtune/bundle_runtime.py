"""The runtime of a slimtune bundle (`slimtune export MODEL --format bundle`), copied into it as slimtune_bundle.py.

It imports onnxruntime, tokenizers, numpy, the standard library and the bundle's own preprocess.py (slimtune's
cleaning code): never slimtune or torch, so `pip install -r requirements.txt` is all a bundle needs.

    from slimtune_bundle import Bundle
    Bundle("path/to/bundle").classify(["A gripping, funny film."])
    # [{"label": "positive", "score": 0.97, "probabilities": {"negative": 0.03, "positive": 0.97}}]

    python slimtune_bundle.py [BUNDLE_DIR] "text" ...   # '-' reads one text per line from stdin; one JSON line
                                                        # per text (a pair model: a TAB separates the two texts)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Bundle:
    """A bundle directory: int8 graph, tokenizer (pads, truncates at the training length), labels, cleaning."""

    def __init__(self, path: str | Path = ".", threads: int | None = None):
        self.path = Path(path)
        labels = json.loads((self.path / "labels.json").read_text(encoding="utf-8"))  # {"0": label, ...}
        self.labels = [labels[str(i)] for i in range(len(labels))]
        record = json.loads((self.path / "preprocessing.json").read_text(encoding="utf-8"))
        self.paired = record.get("text_pair_field") is not None
        spec = importlib.util.spec_from_file_location("slimtune_bundle_preprocess", self.path / "preprocess.py")
        preprocess = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(preprocess)  # the bundle's own copy: the cleaning the model was trained with
        self.preprocess = preprocess.preprocessor_from_record(record)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(self.path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """The graph's logits [len(texts), labels] for one batch, padded to its longest text."""
        first = [self.preprocess(t) for t in texts]
        if pairs is None:
            enc = self.tokenizer.encode_batch(first)
        else:
            enc = self.tokenizer.encode_batch(list(zip(first, [self.preprocess(t) for t in pairs], strict=True)))
        arrays = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                  "token_type_ids": [e.type_ids for e in enc]}
        return self.session.run(["logits"], {n: np.array(arrays[n], dtype=np.int64) for n in self.inputs})[0]

    def classify(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> list[dict]:
        """One {"label", "score", "probabilities": {label: p}} per text (pairs: the second text of each)."""
        if isinstance(texts, str) or isinstance(pairs, str):
            raise TypeError("classify takes a list of texts")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        results = []
        for i in range(0, len(texts), batch_size):
            logits = self.logits(texts[i:i + batch_size], None if pairs is None else pairs[i:i + batch_size])
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for row in probs:
                best = int(row.argmax())
                shares = {label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)}
                results.append({"label": self.labels[best], "score": round(float(row[best]), 6),
                                "probabilities": shares})
        return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(__file__).resolve().parent  # the bundle this file sits in, unless BUNDLE_DIR comes first
    if args and Path(args[0]).is_dir():
        path, args = Path(args[0]), args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: python {Path(sys.argv[0]).name} [BUNDLE_DIR] TEXT... (or - for one text per line on stdin)",
              file=sys.stderr)
        return 0 if args else 2
    texts = [line.rstrip("\n") for line in sys.stdin] if args == ["-"] else args
    try:
        bundle = Bundle(path)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {path}: not a readable slimtune bundle ({e})", file=sys.stderr)
        return 2
    pairs = None
    if bundle.paired:  # "first<TAB>second", as `slimtune predict` reads a pair model's texts
        split = [t.split("\t", 1) for t in texts]
        texts, pairs = [s[0] for s in split], [s[1] if len(s) > 1 else "" for s in split]
    for result in bundle.classify(texts, pairs):
        sys.stdout.write(json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
