"""`stage: distill` — teacher(s) -> student on the one training loop; only the loss differs.

Order of work: load and check the teachers; build the transfer set (the train texts, plus
teacher-labelled EDA copies if `transfer_augment`); build the student and encode the texts with its
tokenizer; label the transfer set with every teacher once (cached on disk); train the student with
the distillation loss; the student (and its tokenizer) becomes the run's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.augment import EmbeddingSynonyms, augment_texts
from slimtune.batching import EncodedDataset, encode, pad_id_of
from slimtune.config import AugmentConfig, IntermediateConfig, LoopConfig, StudentSpec, TeacherSpec
from slimtune.distill.losses import DistillModel, layer_mapping, make_distill_loss
from slimtune.distill.students import Student, build_student, encoder_shape, student_blueprint
from slimtune.distill.teachers import Teacher, cached_teacher_outputs, check_teacher, combine_teachers, load_teachers
from slimtune.distill.word_defaults import word_student_updates
from slimtune.errors import SlimtuneError
from slimtune.evaluate import count_parameters
from slimtune.models import load_tokenizer
from slimtune.stages.base import Run, console
from slimtune.stages.distill_online import online_option_problem, rebuild_online, run_online, validate_online
from slimtune.train import seed_everything
from slimtune.wordlists import common_words, read_word_list
from slimtune.wordmodels import WORD_ARCHS, compact_table_


class DistillConfig(LoopConfig):
    stage: Literal["distill"]
    teacher: str | TeacherSpec | list[str | TeacherSpec] = Field(json_schema_extra={"ref": "model"})
    combine: Literal["weighted", "best"] = Field(
        "weighted", description="multi-teacher: weighted average, or per example the most confident correct one")
    student: StudentSpec = StudentSpec()
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft-target loss; 1 - alpha: hard labels")
    soft_loss: Literal["kl", "mse"] = Field(
        "kl", description="kl: KL of the T-softened distributions x T^2 (Hinton et al.); mse: squared error "
                          "of the centred logits (Tang et al. 2019, for small non-transformer students)")
    intermediate: IntermediateConfig | None = None
    transfer_augment: AugmentConfig | None = Field(
        None, description="EDA copies of the train texts, labelled by the teacher only (TinyBERT)")
    cache: Path | None = Field(None, json_schema_extra={"ref": "file"},
                               description="teacher-output cache file (default: under $SLIMTUNE_HOME)")
    lr: float | Literal["auto"] = 1e-4

    def teachers(self) -> list[TeacherSpec]:
        items = self.teacher if isinstance(self.teacher, list) else [self.teacher]
        return [t if isinstance(t, TeacherSpec) else TeacherSpec(path=t) for t in items]

    def problem_for(self, task) -> str | None:
        """The first key (path: why) that `task` cannot use; the recipe is refused with it when read."""
        return online_option_problem(self) if task.soft_targets == "token" else None


@dataclass
class DistillSetup:
    teachers: list[Teacher]
    student: Student
    texts: list[str]
    pairs: list[str] | None
    labels: list[int]
    labelled: list[bool]  # False for teacher-only (augmented transfer) examples
    mapping: list[tuple[int, int]]
    granularity: str


def _same_tokenizer(a, b) -> bool:
    get = lambda t: t.get_vocab() if hasattr(t, "get_vocab") else None  # noqa: E731
    return type(a) is type(b) and get(a) is not None and get(a) == get(b)


def _transfer_set(run: Run, cfg: DistillConfig, teacher: Teacher):
    train = run.data.train
    texts, labels, pairs = list(train.texts), list(train.labels), train.pairs
    n = len(texts)
    if cfg.transfer_augment is not None and cfg.transfer_augment.copies > 0:
        aug = cfg.transfer_augment
        synonyms = None
        if aug.p_synonym > 0 or aug.p_insert > 0:  # neighbours in the teacher's own embedding table
            synonyms = EmbeddingSynonyms(teacher.tokenizer, teacher.model.get_input_embeddings().weight.detach(),
                                         k=aug.neighbours, min_similarity=aug.min_similarity)
        texts, labels, pairs = augment_texts(texts, labels, aug, synonyms, pairs)
    return texts, pairs, labels, [i < n for i in range(len(texts))]


def _intermediate_plan(cfg: DistillConfig, kind: str, student_config, teacher_config, same_tokenizer: bool
                       ) -> tuple[list, str]:
    inter = cfg.intermediate
    if inter is None:
        return [], "none"
    s_shape, t_shape = encoder_shape(student_config), encoder_shape(teacher_config)
    n_student = s_shape[0] if s_shape is not None else WORD_ARCHS[kind].LAYERS
    if t_shape is None:
        raise SlimtuneError("intermediate: the teacher has no transformer layers to match")
    granularity = inter.granularity if inter.granularity != "auto" else ("token" if same_tokenizer else "pooled")
    if granularity == "token" and not same_tokenizer:
        raise SlimtuneError("intermediate.granularity: token-level matching needs the student and the teacher to "
                            "share a tokenizer; use granularity: pooled")
    if "attention" in inter.loss:
        if s_shape is None:
            raise SlimtuneError(f"intermediate.loss: the {kind} student has no attention maps; use loss: mse")
        if granularity != "token":
            raise SlimtuneError("intermediate.loss: attention maps can only be matched token by token "
                                "(same tokenizer for student and teacher)")
        if s_shape[2] != t_shape[2]:
            raise SlimtuneError(f"intermediate.loss: attention maps need equal head counts (student {s_shape[2]}, "
                                f"teacher {t_shape[2]}); use loss: mse")
    mapping = layer_mapping(inter.mapping, n_student, t_shape[0])
    if not mapping:
        raise SlimtuneError(f"intermediate: the {kind} student has only its word vectors to match; give "
                            "mapping: [[0, TEACHER_LAYER]]")
    return mapping, granularity


def validate_distill(run: Run, cfg: DistillConfig) -> None:
    """Every input error of this stage, found from configs and tokenizers before the run starts."""
    from transformers import AutoConfig

    paths = [check_teacher(spec, run.data.id2label) for spec in cfg.teachers()]
    teacher_config = AutoConfig.from_pretrained(paths[0], local_files_only=True)
    teacher_tokenizer = load_tokenizer(paths[0])
    kind, config, tokenizer = student_blueprint(cfg.student, current_config=run.model.config,
                                                current_tokenizer=run.tokenizer, teacher_path=paths[0],
                                                teacher_tokenizer=teacher_tokenizer)
    same = tokenizer is not None and _same_tokenizer(tokenizer, teacher_tokenizer)
    _intermediate_plan(cfg, kind, config, teacher_config, same)
    layer, n_layers = cfg.student.embedding_layer, int(getattr(teacher_config, "num_hidden_layers", 0) or 0)
    if cfg.student.init_embeddings == "contextual" and layer is not None and layer > n_layers:
        raise SlimtuneError(f"student.embedding_layer {layer}: the teacher has hidden states 0-{n_layers}")
    for key in ("extend_vocab", "extra_words", "pca_dims"):
        if getattr(cfg.student, key) not in (None, False) and cfg.student.init_embeddings != "contextual":
            raise SlimtuneError(f"student.{key} needs init_embeddings: contextual (it works on the teacher's "
                                "word vectors)")
    if cfg.student.table != "float32" and cfg.student.arch is None:
        raise SlimtuneError(f"student.table {cfg.student.table}: only a word student (student.arch) has a word-"
                            "vector table to store small; a transformer is made smaller with stage: quantize")
    if cfg.student.lstm != "float32" and cfg.student.arch != "bilstm":
        raise SlimtuneError(f"student.lstm {cfg.student.lstm}: only a word BiLSTM (student.arch: bilstm) has an "
                            "LSTM to run in int8")
    extra = cfg.student.extra_words
    if cfg.student.arch is not None and extra is not None:  # refused before the run's output exists:
        if isinstance(extra, int):
            common_words(1)  # wordfreq missing
        else:
            read_word_list(extra)  # unreadable, malformed or empty


def setup_distill(run: Run, cfg: DistillConfig) -> DistillSetup:
    teachers = load_teachers(cfg.teachers(), run.data.id2label)
    first = teachers[0]
    texts, pairs, labels, labelled = _transfer_set(run, cfg, first)
    seed_everything(cfg.seed)  # new heads / word students start from the same weights in every run
    student = build_student(cfg.student, current=run.model, current_tokenizer=run.tokenizer,
                            teacher_model=first.model, teacher_tokenizer=first.tokenizer,
                            id2label=run.data.id2label, texts=texts, teacher_path=first.path)
    student.model.requires_grad_(True)  # a layer selection copies the (frozen) teacher
    if student.kind == "bilstm":  # eval mode runs this kernel from the start: checkpoints are chosen on it
        student.model.config.lstm = cfg.student.lstm
    if cfg.student.freeze_embeddings:  # the teacher-initialised vectors stay as they are while training
        student.model.get_input_embeddings().requires_grad_(False)
        if student.kind in WORD_ARCHS:  # and are stored as they will ship, so training sees what ships
            compact_table_(student.model, cfg.student.table)
    mapping, granularity = _intermediate_plan(cfg, student.kind, student.model.config, first.model.config,
                                              _same_tokenizer(student.tokenizer, first.tokenizer))
    if cfg.intermediate is not None and "attention" in cfg.intermediate.loss:
        for m in (student.model, first.model):  # sdpa kernels do not return attention maps
            m.set_attn_implementation("eager")
    return DistillSetup(teachers, student, texts, pairs, labels, labelled, mapping, granularity)


def _adopt_student(run: Run, setup: DistillSetup, select_ds: EncodedDataset | None = None) -> None:
    """The student (and its tokenizer) become the run's model; the data is re-encoded for it
    (`select_ds`: the selection split already encoded with the student's tokenizer)."""
    run.adopt_tokenizer(setup.student.tokenizer, select_ds)
    run.model = setup.student.model
    for p in run.model.parameters():
        p.requires_grad_(True)


class Distill:
    name: ClassVar[str] = "distill"
    Config: ClassVar[type] = DistillConfig

    def __init__(self, config: DistillConfig):
        self.config = config
        self.defaults: dict = {}  # a word student's fields the recipe left unset, as filled in

    # per-token soft targets (a causal LM's vocabulary at every position) are too large to cache: the
    # teachers run online (stages/distill_online.py); per-example ones are cached once (below)
    def validate(self, run: Run) -> None:
        run.loop_direction(self.config)
        if run.task.soft_targets != "token" and self.config.student.arch is not None:
            self.config, self.defaults = _with_word_defaults(run, self.config)
        (validate_online if run.task.soft_targets == "token" else validate_distill)(run, self.config)

    def rebuild(self, run: Run) -> None:
        """On --resume past this stage: rebuild the student's structure (weights come from the checkpoint)."""
        if run.task.soft_targets == "token":
            rebuild_online(run, self.config)
        else:
            setup = setup_distill(run, self.config)
            if setup.student.kind in WORD_ARCHS:
                compact_table_(setup.student.model, self.config.student.table)
            _adopt_student(run, setup)

    def run(self, run: Run) -> dict:
        record = (run_online if run.task.soft_targets == "token" else run_distill)(run, self.config)
        return record | ({"word_student_defaults": self.defaults} if self.defaults else {})


def _with_word_defaults(run: Run, cfg: DistillConfig) -> tuple[DistillConfig, dict]:
    """`cfg` with a word student's measured-best recipe in every field the recipe left unset
    (`distill/word_defaults.py`), and those fields as filled in."""
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(check_teacher(cfg.teachers()[0], run.data.id2label), local_files_only=True)
    stage, student, notes = word_student_updates(cfg, int(getattr(teacher, "num_hidden_layers", 0) or 0),
                                                 int(getattr(teacher, "hidden_size", 0) or 0), len(run.data.train))
    for note in notes:
        console.print(f"distill: {note}")
    if "intermediate" in stage:
        stage["intermediate"] = IntermediateConfig(**stage["intermediate"])
    resolved = cfg.model_copy(update=stage | {"student": cfg.student.model_copy(update=student)})
    applied = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in stage.items()}
    return resolved, applied | ({"student": student} if student else {})


def run_distill(run: Run, cfg: DistillConfig) -> dict:
    setup = setup_distill(run, cfg)
    for t in setup.teachers:  # built on the CPU with the student; they label the transfer set on the run's device
        t.model.to(run.device)
    max_length = run.max_length
    pooled_layers = sorted({t for _, t in setup.mapping}) if setup.granularity == "pooled" else []
    outputs = cached_teacher_outputs(setup.teachers, setup.texts, setup.pairs, max_length, pooled_layers, cfg.cache,
                                     log=console.print)
    labels = torch.tensor(setup.labels)
    labelled = torch.tensor(setup.labelled)
    soft = combine_teachers([o["logits"] for o in outputs], [t.weight for t in setup.teachers], cfg.temperature,
                            cfg.combine, labels, labelled)
    primary = run.task.primary.name
    teacher_metric = {}
    for t in setup.teachers:  # the teachers' own metric on the eval split, for "% of teacher" in the report
        dev = encode(t.tokenizer, run.data.eval.texts, run.data.eval.labels, run.data.eval.pairs, max_length)
        teacher_metric[t.name] = run.task.eval_fn(dev, t.pad_id)(t.model)[primary]

    student = setup.student
    train_ds = encode(student.tokenizer, setup.texts, setup.labels, setup.pairs, max_length)
    sel = run.data.select
    select_ds = encode(student.tokenizer, sel.texts, sel.labels, sel.pairs, max_length)
    pad = pad_id_of(student.tokenizer)
    model = DistillModel(student.model, setup.mapping if "mse" in _losses(cfg) else [],
                         _state_widths(student.model), encoder_shape(setup.teachers[0].model.config)[1])
    # z-scores per dimension: a transformer's few outlier dimensions would otherwise own the MSE
    pooled = {t: _standardised(outputs[0][f"pooled{t}"]) for t in pooled_layers}

    def make_batch(ds: EncodedDataset, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = run.task.collate(ds, idx, pad)
        rows = torch.tensor(idx)
        batch["soft_targets"], batch["labelled"] = soft[rows], labelled[rows]
        for t, values in pooled.items():
            batch[f"pooled{t}"] = values[rows]
        return batch

    loss_fn = make_distill_loss(temperature=cfg.temperature, alpha=cfg.alpha, mapping=setup.mapping,
                                granularity=setup.granularity, use_mse="mse" in _losses(cfg),
                                use_attention="attention" in _losses(cfg),
                                weight=cfg.intermediate.weight if cfg.intermediate else 0.0,
                                online_teacher=setup.teachers[0].model if setup.granularity == "token" else None,
                                soft_loss=cfg.soft_loss)
    lr, bs = run.resolve_auto(cfg, model, loss_fn, train_ds=train_ds, make_batch=make_batch)
    res = run.fit(model, cfg, lr=lr, batch_size=bs, loss_fn=loss_fn, make_batch=make_batch, train_ds=train_ds,
                  eval_ds=select_ds, pad_id=pad)
    word_record = _store_word_table(run, student, cfg.student.table, select_ds, pad) \
        if student.kind in WORD_ARCHS else {}
    word_record |= _int8_lstm_record(run, student, select_ds, pad)
    params, trainable = count_parameters(student.model)  # a compact table's codes count as its weights
    _adopt_student(run, setup, select_ds)
    return {"stage": "distill", "student": student.kind, "student_source": student.source,
            "teachers": [{"model": t.name, "weight": t.weight, "params": sum(p.numel() for p in t.model.parameters()),
                          f"dev_{primary}": teacher_metric[t.name]} for t in setup.teachers],
            "combine": cfg.combine, "temperature": cfg.temperature, "alpha": cfg.alpha, "soft_loss": cfg.soft_loss,
            "intermediate": {"mapping": [list(p) for p in setup.mapping], "granularity": setup.granularity,
                             "loss": cfg.intermediate.loss} if cfg.intermediate else None,
            "transfer_rows": len(setup.texts), "augmented_transfer_rows": len(setup.texts) - sum(setup.labelled),
            "trainable_params": trainable, "trainable_pct": round(100 * trainable / params, 3), **word_record,
            **res.summary()}


def _store_word_table(run: Run, student: Student, storage: str, select_ds: EncodedDataset, pad: int) -> dict:
    """A trained word table stored as `storage` (a frozen one already is), with the selection-split metric
    before and after when that changed the weights."""
    table = student.model.get_input_embeddings()
    record: dict = {"table": storage}
    if storage != getattr(student.model.config, "table", "float32"):
        metric = run.task.primary.name
        measure = run.task.eval_fn(select_ds, pad)
        before = measure(student.model)[metric]
        compact_table_(student.model, storage)
        record |= {f"select_{metric}_float_table": before, f"select_{metric}_{storage}_table":
                   measure(student.model)[metric]}
        table = student.model.get_input_embeddings()
    record["table_mb"] = round(sum(b.numel() * b.element_size() for b in [*table.buffers(), *table.parameters()])
                               / 1e6, 3)
    return record


def _int8_lstm_record(run: Run, student: Student, select_ds: EncodedDataset, pad: int) -> dict:
    """What the int8 LSTM costs: the selection-split metric with it and with the float LSTM it is made from."""
    config = student.model.config
    if getattr(config, "lstm", "float32") != "int8":
        return {}
    metric, measure = run.task.primary.name, run.task.eval_fn(select_ds, pad)
    int8 = measure(student.model)[metric]
    config.lstm = "float32"
    try:
        float32 = measure(student.model)[metric]
    finally:
        config.lstm = "int8"
    return {"lstm": "int8", f"select_{metric}_float_lstm": float32, f"select_{metric}_int8_lstm": int8}


def _state_widths(model) -> list[int]:
    if hasattr(model, "state_widths"):  # word students
        return model.state_widths()
    layers, hidden, _ = encoder_shape(model.config)
    return [hidden] * (layers + 1)


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6) if len(x) > 1 else x


def _losses(cfg: DistillConfig) -> str:
    return cfg.intermediate.loss if cfg.intermediate else ""
