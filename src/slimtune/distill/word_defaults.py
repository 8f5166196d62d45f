"""What a word student trains with when the recipe says only `student: {arch: bilstm}`: the recipe that
measured best (docs/benchmarks.md: "Distillation" for the recipe, "Word students: the defaults on a small
set" for these defaults against the old ones), filled into every field the recipe leaves unset, and
adapted to the teacher and the data size.

Why defaults matter here more than for a transformer student: a word student starts from nothing but
its word vectors. With input-embedding init, a trainable table, the texts' words only and 3 epochs of
KL on 2,000 rows, a BiLSTM scored 0.577 against its teacher's 0.775, near chance; the measured recipe
reads each word's contextual vector from the teacher (Model2Vec-style), keeps the table fixed (and
int8), gives vectors to words the texts lack, and learns the teacher's logits by MSE (Tang et al. 2019)
plus its mean-pooled middle layer, on a transfer set of teacher-labelled word spans of the train texts, for
enough optimizer steps whatever the data size. A BiLSTM then runs its LSTM on int8 kernels at inference
(2.3x the batch-32 throughput at 0.1 pt lower mean accuracy on SST-2).
"""

from __future__ import annotations

import math
from importlib.util import find_spec

from slimtune.config import AugmentConfig

# student fields (StudentSpec) and stage fields (the distill stage's config), each used where unset
STUDENT = {"init_embeddings": "contextual", "freeze_embeddings": True, "extend_vocab": True,
           "extra_words": 50000, "pca_dims": 256, "table": "int8", "lstm": "int8"}
STAGE = {"soft_loss": "mse", "alpha": 1.0, "lr": 1e-3, "batch_size": 64}
CONTEXTUAL_ONLY = ("extend_vocab", "extra_words", "pca_dims")  # they work on the teacher's vectors
TARGET_STEPS = 800  # optimizer steps: 8 epochs of SST-2's 6,920 rows at batch 64, where the bench peaked
MAX_EPOCHS = 40
# the phrase-level transfer set: random word spans of every train sentence, labelled by the teacher (Tang et
# al.'s n-gram sampling). On SST-2, 10 per sentence (68,508 rows) and 10 epochs: 0.8532 -> 0.8899 dev. Spans are
# added until the set is about that large, so a large train set costs no extra teacher labelling.
SPAN_COPIES = 10
TRANSFER_ROWS = 70_000
SPAN_EPOCHS = 10


def span_copies(rows: int) -> int:
    """Spans per train sentence for a transfer set of about `TRANSFER_ROWS` rows, at most `SPAN_COPIES`."""
    return max(0, min(SPAN_COPIES, math.ceil(TRANSFER_ROWS / max(rows, 1)) - 1))


def epochs_for(rows: int, batch_size: int) -> int:
    """Enough epochs for `TARGET_STEPS` optimizer steps, at least 8 and at most `MAX_EPOCHS` (keep-best on
    the selection split guards the long end)."""
    return max(8, min(MAX_EPOCHS, math.ceil(TARGET_STEPS * batch_size / max(rows, 1))))


def word_student_updates(cfg, teacher_layers: int, teacher_width: int, rows: int) -> tuple[dict, dict, list[str]]:
    """(stage updates, student updates, notes) that fill the unset fields of distill config `cfg` for a
    word student, given its first teacher's layer count and hidden size and the number of training rows.
    Contextual word vectors need a teacher with hidden layers: without them the table starts from the
    teacher's input embeddings and trains, and a note says so."""
    spec, notes = cfg.student, []
    student = {k: v for k, v in STUDENT.items() if k not in spec.model_fields_set}
    contextual = student.get("init_embeddings", spec.init_embeddings) == "contextual"
    if contextual and not teacher_layers and "init_embeddings" in student:
        notes.append("the teacher has no hidden layers, so it gives no contextual word vectors: the word "
                     "table starts from its input embeddings and trains (no extra words, no PCA)")
        student |= {"init_embeddings": "input", "freeze_embeddings": False}
        contextual = False
    if not contextual:
        for key in CONTEXTUAL_ONLY:
            student.pop(key, None)
    if student.get("pca_dims", 0) >= teacher_width:
        student.pop("pca_dims", None)  # the teacher's vectors are no wider than that already
    if student.get("extra_words") and find_spec("wordfreq") is None:
        student.pop("extra_words")
        notes.append("no extra words for the word student: the wordfreq package is missing (pip install "
                     "'slimtune[words]'); dev words outside the vocabulary become [UNK]")
    if "table" in student and not student.get("freeze_embeddings", spec.freeze_embeddings):
        student.pop("table")  # a trained table stays float unless asked
    if spec.arch != "bilstm":
        student.pop("lstm", None)
    stage = {k: v for k, v in STAGE.items() if k not in cfg.model_fields_set}
    if "transfer_augment" in cfg.model_fields_set:  # the recipe's own set, or none (null)
        copies = cfg.transfer_augment.copies if cfg.transfer_augment is not None else 0
    elif copies := span_copies(rows):
        stage["transfer_augment"] = AugmentConfig.spans(copies)
        notes.append(f"the transfer set adds {copies} random word spans of each train text, labelled by the "
                     f"teacher ({rows * (1 + copies):,} rows, labelled once and cached; transfer_augment: null "
                     "turns it off)")
    batch = stage.get("batch_size", cfg.batch_size)
    if "epochs" not in cfg.model_fields_set:
        epochs = epochs_for(rows * (1 + copies), batch if isinstance(batch, int) else STAGE["batch_size"])
        stage["epochs"] = max(epochs, SPAN_EPOCHS) if copies else epochs
    if "intermediate" not in cfg.model_fields_set and spec.arch == "bilstm" and teacher_layers:
        # its mean-pooled outputs (state 1) learn the teacher's mean-pooled middle layer
        stage["intermediate"] = {"loss": "mse", "mapping": [[1, teacher_layers // 2]]}
    return stage, student, notes
