"""Typed recipe: YAML (or Python objects) -> validated pydantic models.

A recipe is an ordered list of typed stages (the llm-compressor habit). Every model forbids
unknown keys, and `load_recipe` turns pydantic's errors into one line that names the field and
suggests the closest valid key, e.g. `recipe.yaml: stages.0.lerning_rate: unknown key (did you mean 'lr'?)`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimtune.errors import SlimtuneError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class AugmentConfig(Strict):
    """EDA-style augmentation (Wei & Zou 2019) plus n-gram sampling. Each `p_*` is the fraction of
    words an operation touches in one copy; 0 disables it. Synonyms are nearest neighbours in the model's own
    word-embedding table, so this works offline and in any language the vocabulary covers."""

    copies: int = Field(4, ge=0, description="augmented copies added per training example")
    p_synonym: float = Field(0.1, ge=0, le=1)
    p_insert: float = Field(0.1, ge=0, le=1)
    p_swap: float = Field(0.1, ge=0, le=1)
    p_delete: float = Field(0.1, ge=0, le=1)
    p_span: float = Field(0.0, ge=0, le=1, description="n-gram sampling (Tang et al. 2019): a copy is a random "
                                                        "contiguous span of up to this fraction of the words")
    neighbours: int = Field(10, ge=1, description="candidate synonyms per word (embedding top-k)")
    min_similarity: float = Field(0.5, ge=-1, le=1, description="cosine floor for a synonym")
    seed: int = 0


class DataConfig(Strict):
    train: Path
    eval: Path | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "datasets"] = "auto"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    label_names: dict[int, str] | None = Field(
        None, description="names for integer labels, e.g. {0: negative, 1: positive}"
    )
    max_length: int = Field(128, ge=8, le=8192)
    clean: bool = True  # strip HTML, control/zero-width chars, NFKC, collapse whitespace
    lowercase: bool = False
    segment_chinese: bool = False  # jieba word segmentation before tokenization
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when no eval file")
    split_seed: int = 42
    train_limit: int | None = Field(None, ge=1, description="stratified sample of N train rows")
    eval_limit: int | None = Field(None, ge=1, description="stratified sample of N eval rows")
    augment: AugmentConfig | None = None


# ------------------------------------------------------------------------------------------- stages
class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: float = 16
    dropout: float = Field(0.1, ge=0, lt=1)
    # BERT-style names; PEFT matches them as suffixes of module names.
    target_modules: list[str] = ["query", "value"]
    save_adapter_only: bool = False  # True: OUT/model holds only the PEFT adapter + head


class IterativeConfig(Strict):
    """Cascaded unfreezing: head first, then layer groups top-down (ULMFiT-style)."""

    group_size: int = Field(2, ge=1, description="encoder layers unfrozen per phase")
    max_epochs_per_phase: int = Field(2, ge=1)
    patience: int = Field(1, ge=0, description="evals without improvement that end a phase")
    min_delta: float = Field(0.001, ge=0)
    lr_decay: float = Field(1.0, gt=0, le=1, description="lr multiplier applied at each new phase")
    include_embeddings: bool = False  # unfreeze embeddings in a final phase


class EarlyStopping(Strict):
    patience: int = Field(2, ge=0)
    min_delta: float = Field(0.0, ge=0)


class LoopConfig(Strict):
    """Keys of the one training loop (train.py); every training stage has them."""

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float | Literal["auto"] = 5e-5
    batch_size: int | Literal["auto"] = 32
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: Literal["linear", "cosine", "constant", "plateau"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(0, ge=0)
    metric: Literal["accuracy", "f1_macro", "loss"] = "accuracy"
    eval_every: int | None = Field(None, ge=1, description="steps between dev evals (default: epoch)")
    early_stopping: EarlyStopping | None = None
    keep_best: bool = True  # restore the best dev weights at the end
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep a moving average of the weights (this "
                                    "decay per optimizer step); evals, the kept best and the final model use it")
    seed: int = 42
    checkpoint_every: int | None = Field(None, ge=1, description="steps; epoch ends always checkpoint")
    bucket_by_length: bool = True

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("lr must be > 0 or 'auto'")
        return v

    @field_validator("batch_size")
    @classmethod
    def _positive_bs(cls, v):
        if v != "auto" and not v >= 1:
            raise ValueError("batch_size must be >= 1 or 'auto'")
        return v


class FinetuneStage(LoopConfig):
    stage: Literal["finetune"]
    method: Literal["full", "freeze", "head", "lora", "iterative"] = "full"
    freeze_layers: int = Field(3, ge=0, description="method=freeze: first N encoder layers frozen")
    freeze_embeddings: bool = True
    lora: LoraConfig = LoraConfig()
    iterative: IterativeConfig = IterativeConfig()


class EvaluateStage(Strict):
    stage: Literal["evaluate"]
    speed: bool = True  # measure latency / throughput
    latency_runs: int = Field(50, ge=1)
    throughput_batches: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads for speed (default: all)")


class TeacherSpec(Strict):
    path: str  # model directory or alias of a fine-tuned classifier
    weight: float = Field(1.0, gt=0, description="share in the weighted average of teacher distributions")


class StudentSpec(Strict):
    """Where the student comes from. Nothing set: the run's current model is the student."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    from_: str | None = Field(None, alias="from", description="model dir or alias (default for layers: the teacher)")
    layers: list[int] | None = Field(None, description="keep these encoder layers (DistilBERT-style init)")
    arch: Literal["bilstm", "cnn"] | None = None  # word-level student trained from scratch
    hidden: int = Field(256, ge=1, description="word students: LSTM units per direction / CNN filters per width")
    embed_dim: int = Field(300, ge=1, description="word students without teacher-initialised embeddings")
    init_embeddings: bool | Literal["input", "contextual"] = Field(
        "input", description="word students: input = mean of the teacher's sub-token input embeddings; contextual "
                             "= the teacher's hidden state of each word alone (Model2Vec-style); false = random")
    embedding_layer: int | None = Field(None, ge=0, description="contextual: teacher hidden state to read (0 = "
                                                                "embedding output; default the middle layer)")
    freeze_embeddings: bool = Field(False, description="word students: keep the initialised embeddings fixed")
    extend_vocab: bool = Field(False, description="contextual word students: add the teacher tokenizer's whole "
                                                  "words to the vocabulary (fewer [UNK] on new text)")
    extra_words: int | Path | None = Field(
        None, description="contextual word students: also give these words a vector: N = the language's N most "
                          "frequent words (the wordfreq package), or a text file with one word per line")
    pca_dims: int | None = Field(None, ge=1, description="contextual word students: keep this many principal "
                                                          "components of the teacher's vectors (Model2Vec)")
    max_vocab: int = Field(30000, ge=10, description="word students: the texts' most frequent words kept (specials "
                                                     "included); extend_vocab / extra_words come on top")
    dropout: float = Field(0.2, ge=0, lt=1)

    @field_validator("extra_words")
    @classmethod
    def _positive_count(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("extra_words must be a word count >= 1 or a file")
        return v


class IntermediateConfig(Strict):
    """Hidden-state (and attention-map) matching between mapped student and teacher layers."""

    loss: Literal["mse", "attention", "mse+attention"] = "mse"
    mapping: Literal["uniform", "last"] | list[tuple[int, int]] = Field(
        "uniform", description="[[student_layer, teacher_layer], ...] (1-based; 0 = embeddings) or a rule")
    granularity: Literal["auto", "token", "pooled"] = Field(
        "auto", description="token-level needs the same tokenizer; auto picks token when possible")
    weight: float = Field(1.0, ge=0)


class DistillStage(LoopConfig):
    stage: Literal["distill"]
    teacher: str | TeacherSpec | list[str | TeacherSpec]
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
    cache: Path | None = Field(None, description="teacher-output cache file (default: under $SLIMTUNE_HOME)")
    lr: float | Literal["auto"] = 1e-4

    def teachers(self) -> list[TeacherSpec]:
        items = self.teacher if isinstance(self.teacher, list) else [self.teacher]
        return [t if isinstance(t, TeacherSpec) else TeacherSpec(path=t) for t in items]


class RecoverConfig(LoopConfig):
    """Fine-tuning after pruning, on the one loop; optionally distilled from the unpruned model or from
    a (stronger) fine-tuned teacher."""

    epochs: float = Field(1, gt=0)
    distill_from_unpruned: bool = False
    teacher: str | None = Field(None, description="soft targets of this fine-tuned classifier (dir or alias), "
                                                  "computed once on the train texts and cached")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft targets (unpruned model or teacher)")
    hidden_weight: float = Field(0.0, ge=0, description="distill_from_unpruned: weight of the token-level MSE "
                                                        "between every hidden state and the unpruned model's")

    @model_validator(mode="after")
    def _one_teacher(self):
        if self.teacher is not None and self.distill_from_unpruned:
            raise ValueError("recover: choose one source of soft targets, teacher or distill_from_unpruned")
        if self.hidden_weight and not self.distill_from_unpruned:
            raise ValueError("recover: hidden_weight needs distill_from_unpruned (the hidden states it matches)")
        return self


class IterativePruneConfig(Strict):
    """N rounds of prune -> recover -> evaluate; each round moves 1/N of the way to the final amounts."""

    rounds: int = Field(3, ge=1)
    method: Literal["magnitude", "activation", "structured"] = "magnitude"
    max_drop: float = Field(0.01, ge=0, description="stop when dev accuracy falls this far below the start")
    rewind: bool = Field(False, description="magnitude/activation: reset survivors to the stage-start weights "
                                            "before each recovery (lottery-ticket style)")


class PruneStage(Strict):
    stage: Literal["prune"]
    method: Literal["magnitude", "activation", "structured", "iterative"] = "magnitude"
    # magnitude / activation
    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of the target weights set to zero")
    threshold: float | None = Field(None, ge=0, description="magnitude: zero every |w| below this instead")
    scope: Literal["per_layer", "global"] = "per_layer"
    norm: Literal["l1", "l2", "none"] = "l1"
    schedule: Literal["oneshot", "gradual"] = Field(
        "oneshot", description="magnitude: gradual = cubic schedule (Zhu & Gupta) during recovery")
    gradual_end: float = Field(0.8, gt=0, le=1, description="gradual: share of the recovery steps by which the "
                                                            "final sparsity is reached; the rest recovers at it")
    n_m: tuple[int, int] | None = Field(None, description="activation: N:M sparsity, e.g. [2, 4]")
    targets: list[str] | None = Field(None, description="module-name patterns (default: encoder Linears)")
    ignore: list[str] | None = None
    calibration_batches: int = Field(8, ge=1, description="train batches for activation norms / importance")
    calibration_batch_size: int = Field(16, ge=1)
    # structured
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of FFN intermediate neurons removed")
    layers: int = Field(0, ge=0, description="whole encoder layers removed")
    importance: Literal["gradient", "weight"] = "gradient"
    uniform: bool = Field(True, description="the same number of heads/neurons removed in every layer")
    drop_empty_layers: bool = False  # a layer that loses every head is dropped instead of refused
    recover: RecoverConfig | None = None
    iterative: IterativePruneConfig = IterativePruneConfig()
    seed: int = 42


class QATConfig(LoopConfig):
    """Training with quantized weights in the forward pass (straight-through estimator), on the one
    loop; optionally distilled from the full-precision model the stage started with."""

    epochs: float = Field(1, gt=0)
    distill_from_full: bool = True
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the full-precision model's soft targets")


class MixedPrecisionConfig(Strict):
    """Per-layer bit widths from a sensitivity analysis, under a size budget."""

    bits: list[int] = Field([8, 4], min_length=1, description="candidate weight bit widths per layer")
    budget_bits: float = Field(6.0, gt=0, description="average bits per quantized weight allowed")
    sensitivity: Literal["accuracy", "output_error"] = Field(
        "output_error", description="rank layers by dev-accuracy drop, or by logit error on calibration data, "
                                    "when only that layer is quantized to the lowest candidate")


class QuantizeStage(Strict):
    stage: Literal["quantize"]
    method: Literal["dynamic_int8", "static_int8", "weight_only", "fixed_point", "binary", "ternary", "mixed",
                    "qat"] = "dynamic_int8"
    bits: int = Field(8, description="weight bits: weight_only and qat take 8 or 4")
    group_size: int | None = Field(None, ge=1, description="weights per scale along the input dim (None: per "
                                                             "output channel)")
    symmetric: bool = Field(True, description="symmetric (zero point 0) or asymmetric weights/activations")
    weight_scales: Literal["per_channel", "per_tensor", "auto"] = Field(
        "auto", description="dynamic_int8 / static_int8: one weight scale per output channel, one per "
                                   "matrix (what ONNX Runtime's quantize_dynamic does by default; faster at batch 1), "
                                   "or auto: per channel only where a layer needs it (see per_channel_ratio), one "
                                   "scale shared by layers reading the same input elsewhere")
    per_channel_ratio: float = Field(10.0, gt=1, description="weight_scales auto: per channel when one scale per "
                                                            "matrix gives this many times the weight error")
    algorithm: Literal["rtn", "gptq", "awq"] = Field(
        "rtn", description="weight_only: round-to-nearest, GPTQ error compensation or AWQ activation-aware scaling")
    int_bits: int = Field(1, ge=0, le=15, description="fixed_point: integer bits m of Qm.n (sign bit extra)")
    frac_bits: int = Field(6, ge=0, le=30, description="fixed_point: fraction bits n of Qm.n")
    targets: list[str] | None = Field(None, description="module-name patterns (default: every encoder Linear)")
    ignore: list[str] | None = Field(None, description="module-name patterns left in full precision")
    embeddings: bool = Field(True, description="also store the word embeddings as int8 (per row)")
    calibration_batches: int = Field(8, ge=1, description="train batches for activation ranges / GPTQ / AWQ")
    calibration_batch_size: int = Field(16, ge=1)
    mixed: MixedPrecisionConfig = MixedPrecisionConfig()
    train: QATConfig | None = Field(None, description="binary / ternary / qat: the training (default: 1 epoch)")
    seed: int = 42


class LowrankStage(Strict):
    stage: Literal["lowrank"]
    rank: int | None = Field(None, ge=1, description="keep this many singular values per layer")
    energy: float | None = Field(None, gt=0, le=1, description="or: the smallest rank keeping this share of "
                                                                "the squared singular values")
    targets: list[str] | None = Field(None, description="module-name patterns (default: every encoder Linear)")
    ignore: list[str] | None = None
    recover: RecoverConfig | None = None
    seed: int = 42


Stage = Annotated[FinetuneStage | DistillStage | PruneStage | QuantizeStage | LowrankStage | EvaluateStage,
                  Field(discriminator="stage")]
STAGE_TYPES: dict[str, type[Strict]] = {"finetune": FinetuneStage, "distill": DistillStage, "prune": PruneStage,
                                        "quantize": QuantizeStage, "lowrank": LowrankStage,
                                        "evaluate": EvaluateStage}


class Recipe(Strict):
    task: Literal["text-classification"] = "text-classification"
    model: str = "minilm"
    data: DataConfig
    stages: list[Stage] = Field(min_length=1)


# ------------------------------------------------------------------------------------ load / dump
def _model_for_path(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the location `loc` (for 'did you mean' suggestions)."""
    model: Any = Recipe
    raw: Any = None
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is Recipe and part == "stages":
            model = None
            continue
        if model is None and part in STAGE_TYPES:  # discriminated-union tag in the error location
            model = STAGE_TYPES[part]
            continue
        field = getattr(model, "model_fields", {}).get(part) if model else None
        raw = field.annotation if field else None
        for candidate in getattr(raw, "__args__", (raw,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model


# common spellings from other tools, so their users get a useful suggestion
SYNONYMS = {"learning_rate": "lr", "lerning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
            "bs": "batch_size", "per_device_train_batch_size": "batch_size", "lora_r": "r", "rank": "r",
            "lora_alpha": "alpha", "lora_dropout": "dropout", "max_len": "max_length",
            "max_seq_length": "max_length", "gradient_accumulation_steps": "grad_accum",
            "max_grad_norm": "grad_clip", "lr_scheduler_type": "schedule", "dev": "eval",
            "validation": "eval", "test": "eval", "text_column": "text_field",
            "label_column": "label_field"}


def _describe(err: dict) -> str:
    loc = [p for p in err["loc"] if p not in STAGE_TYPES]
    where = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        owner = _model_for_path(tuple(err["loc"]))
        names = [f.alias or n for n, f in getattr(owner, "model_fields", {}).items()]  # 'from', not 'from_'
        key = str(err["loc"][-1])
        close = [SYNONYMS[key]] if SYNONYMS.get(key) in names else []
        close = close or difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
        return f"{where}: unknown key{hint}"
    if err["type"] == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "")
        close = difflib.get_close_matches(str(tag), list(STAGE_TYPES), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid stages: {', '.join(STAGE_TYPES)}"
        return f"{where}.stage: unknown stage '{tag}' ({hint})"
    if err["type"] == "literal_error":
        value = err.get("input")
        options = err.get("ctx", {}).get("expected", "")
        return f"{where}: invalid value {value!r} (expected {options})"
    return f"{where}: {err['msg']}"


def parse_recipe(raw: dict, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a dict into a Recipe; data paths are made absolute relative to `base_dir`."""
    if not isinstance(raw, dict):
        raise SlimtuneError(f"{source}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        # unknown keys first: a typo usually also causes the "field required" that follows it
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise SlimtuneError(f"{source}: {_describe(errors[0])}") from None
    if base_dir is not None:
        recipe.data.train = _absolute(recipe.data.train, base_dir)
        if recipe.data.eval is not None:
            recipe.data.eval = _absolute(recipe.data.eval, base_dir)
        if _looks_like_path(recipe.model):
            recipe.model = str(_absolute(Path(recipe.model), base_dir))
        for stage in recipe.stages:
            _absolute_stage_paths(stage, base_dir)
    return recipe


def _absolute_stage_paths(stage, base: Path) -> None:
    """Model paths inside stages (teachers, students) and cache files, relative to the recipe."""
    if isinstance(stage, DistillStage):
        fix = lambda name: str(_absolute(Path(name), base)) if _looks_like_path(name) else name  # noqa: E731
        if isinstance(stage.teacher, list):
            stage.teacher = [fix(t) if isinstance(t, str) else t.model_copy(update={"path": fix(t.path)})
                             for t in stage.teacher]
        elif isinstance(stage.teacher, str):
            stage.teacher = fix(stage.teacher)
        else:
            stage.teacher = stage.teacher.model_copy(update={"path": fix(stage.teacher.path)})
        if stage.student.from_:
            stage.student = stage.student.model_copy(update={"from_": fix(stage.student.from_)})
        if isinstance(stage.student.extra_words, Path):
            stage.student = stage.student.model_copy(update={"extra_words": _absolute(stage.student.extra_words, base)})
        if stage.cache is not None:
            stage.cache = _absolute(stage.cache, base)


def _looks_like_path(s: str) -> bool:
    return "/" in s or s.startswith(".")


def _absolute(p: Path, base: Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set data.max_length=64 stages.0.epochs=2`: dotted keys, YAML-typed values."""
    for item in overrides:
        if "=" not in item:
            raise SlimtuneError(f"--set {item!r}: expected KEY=VALUE, e.g. data.max_length=64")
        key, value = item.split("=", 1)
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            idx: Any = int(part) if part.isdigit() else part
            try:
                if isinstance(node, dict) and idx not in node:
                    node[idx] = {}
                node = node[idx]
            except (IndexError, KeyError, TypeError):
                raise SlimtuneError(f"--set {key}: no such entry '{part}' in the recipe") from None
        last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        try:
            node[last] = yaml.safe_load(value)
        except (IndexError, TypeError):
            raise SlimtuneError(f"--set {key}: no such entry '{parts[-1]}' in the recipe") from None
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SlimtuneError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SlimtuneError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raise SlimtuneError(f"{path}: recipe file is empty")
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    return parse_recipe(raw, source=str(path), base_dir=path.resolve().parent)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True, by_alias=True), sort_keys=False)
