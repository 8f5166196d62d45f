"""Typed configuration pieces shared by several layers: the data section, the training loop's keys,
and the sub-configs of methods (LoRA, teachers, students, recovery, QAT...).

Each stage's own config (with its `stage:` and `method:` tags) lives in the stage's module
(`slimtune.stages.*`); the recipe (`slimtune.recipe`) assembles them. Every default is written once, here
or there, never again in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

# config.json model_type of a BERT whose layers have their own head / FFN widths (structured pruning);
# slimtune.models teaches transformers' AutoConfig the type, slimtune.prune.structured defines it
PRUNED_MODEL_TYPE = "slimtune_pruned_bert"


def names_causal_lm(config: dict) -> bool:
    """A model config (config.json as a dict) that names a decoder with a language-model head
    (LlamaForCausalLM, ...) as its architecture."""
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)



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

    @classmethod
    def spans(cls, copies: int, seed: int = 0) -> AugmentConfig:
        """n-gram sampling alone: `copies` random contiguous word spans of each text, the EDA operations off.
        A distillation's phrase-level transfer set (a teacher labels every span)."""
        return cls(copies=copies, p_span=1.0, p_synonym=0.0, p_insert=0.0, p_swap=0.0, p_delete=0.0, seed=seed)



# The selection split: carved from the training data, it picks checkpoints (keep_best), stops early and
# feeds every other choice a stage makes by measuring (mixed-precision sensitivity...), so that the eval
# split only reports. 0 restores deciding on the eval split, whose figures are then optimistic.
SELECT_FRACTION = 0.1
SELECT_HELP = ("share of the train data held back (seeded, stratified) to choose checkpoints and settings on; "
               "0: choose on the eval split")


class Preprocessing(Strict):
    """How raw text becomes model input. Saved in the model directory's config.json
    (`slimtune_preprocessing`), so eval, predict, export and serve treat text exactly as training did;
    a directory without the record gets these defaults."""

    max_length: int = Field(128, ge=8, le=8192, description="tokens per example after truncation")
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    clean: bool = True  # strip HTML, control/zero-width chars, NFKC, collapse whitespace
    lowercase: bool = False
    segment_chinese: bool = False  # jieba word segmentation before tokenization

    @classmethod
    def of(cls, cfg: Preprocessing) -> Preprocessing:
        """The preprocessing part of a data config (or a copy of a record)."""
        return cls(**{k: getattr(cfg, k) for k in cls.model_fields})


class DataConfig(Preprocessing):
    train: Path
    eval: Path | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "datasets"] = "auto"
    label_names: dict[int, str] | None = Field(
        None, description="names for integer labels, e.g. {0: negative, 1: positive}"
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when no eval file")
    select_fraction: float = Field(SELECT_FRACTION, ge=0, lt=1, description=SELECT_HELP)
    split_seed: int = 42
    train_limit: int | None = Field(None, ge=1, description="stratified sample of N train rows")
    eval_limit: int | None = Field(None, ge=1, description="stratified sample of N eval rows")
    augment: AugmentConfig | None = None


class CausalLMData(Strict):
    """The data section of `task: causal-lm`. A raw text file (WikiText, Tiny Shakespeare...), JSON Lines
    with a text field, or instruction JSON Lines (`prompt` / `response`: the model's chat template is
    applied, and only the response is learned). Text is packed into `block_size`-token blocks;
    instruction rows stay one per block."""

    train: Path
    eval: Path | None = None
    format: Literal["auto", "text", "jsonl"] = Field("auto", description="auto: .jsonl/.json -> jsonl, else text")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    block_size: int = Field(512, ge=8, le=131072, description="tokens per training block and eval window")
    stride: int | None = Field(None, ge=1, description="eval window step in tokens (default: block_size, "
                                                       "no overlap); each window scores only its new tokens")
    clean: bool = False  # HTML, control/zero-width chars, NFKC per line; newlines are kept
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-back tail of the train text when no eval file")
    select_fraction: float = Field(SELECT_FRACTION, ge=0, lt=1, description=SELECT_HELP + " (text: the tail of "
                                   "the train text; instruction rows: a seeded share)")
    train_tokens: int | None = Field(None, ge=1, description="use only the first N tokens of the train text")
    eval_tokens: int | None = Field(None, ge=1, description="score only the first N tokens of the eval text")

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride is not None and self.stride > self.block_size:
            raise ValueError(f"stride {self.stride} > block_size {self.block_size} would skip tokens")
        return self


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: float = 16
    dropout: float = Field(0.1, ge=0, lt=1)
    # suffixes of module names (PEFT's rule); default: the attention's query and value projections,
    # whatever the architecture calls them (query/value in BERT, q_proj/v_proj in Llama and MPNet's q/v)
    target_modules: list[str] | None = None
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



class ReportConfig(Strict):
    """What a run measures for its report (OUT/report.html) beyond its stages' own figures: the starting
    model (every ratio's reference) and each stage's output that no evaluate stage measures next, with the
    speed protocol of `stage: evaluate`."""

    start: bool = True
    stages: bool = True
    speed: bool = True
    latency_runs: int = Field(50, ge=1)
    throughput_batches: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1, description="threads for speed (default: all)")


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
    metric: Literal["accuracy", "f1_macro", "perplexity", "loss"] | None = Field(
        None, description="the dev metric that picks the best weights (default: the task's primary metric)")
    eval_every: int | None = Field(None, ge=1, description="steps between dev evals (default: epoch)")
    early_stopping: EarlyStopping | None = None
    keep_best: bool = True  # restore the best dev weights at the end
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep a moving average of the weights (this "
                                    "decay per optimizer step); evals, the kept best and the final model use it")
    seed: int = 42
    checkpoint_every: int | None = Field(None, ge=1, description="steps; epoch ends always checkpoint")
    bucket_by_length: bool = True
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the training forward and loss: bf16 autocast (weights, gradients and AdamW stay fp32) "
                            "or fp32; auto = bf16 on a GPU with bf16 and on a CPU with avx512_bf16 / amx_bf16 for "
                            "models of hidden size >= 256, fp16 with loss scaling on other GPUs, else fp32. "
                            "Evaluations are fp32")

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



class TeacherSpec(Strict):
    path: str = Field(json_schema_extra={"ref": "model"}, description="model directory or alias of a fine-tuned "
                                                                       "model of the run's task")
    weight: float = Field(1.0, gt=0, description="share in the weighted average of teacher distributions")



class StudentSpec(Strict):
    """Where the student comes from. Nothing set: the run's current model is the student."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    from_: str | None = Field(None, alias="from", json_schema_extra={"ref": "model"},
                              description="model dir or alias, or `current`: the run's own model (the default "
                                          "without layers; with layers the default is the teacher)")
    layers: list[int] | int | None = Field(
        None, description="keep these encoder/decoder layers (DistilBERT-style init); a count N keeps N evenly "
                          "spaced layers, the first and the last included")
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
        None, json_schema_extra={"ref": "file"},
        description="contextual word students: also give these words a vector: N = the language's N most "
                          "frequent words (the wordfreq package), or a text file with one word per line")
    pca_dims: int | None = Field(None, ge=1, description="contextual word students: keep this many principal "
                                                          "components of the teacher's vectors (Model2Vec)")
    max_vocab: int = Field(30000, ge=10, description="word students: the texts' most frequent words kept (specials "
                                                     "included); extend_vocab / extra_words come on top")
    dropout: float = Field(0.2, ge=0, lt=1)
    table: Literal["float32", "float16", "int8"] = Field(
        "float32", description="word students: how the word-vector table is stored once trained (int8: one "
                               "scale per row; a frozen table is stored so from the start)")
    lstm: Literal["float32", "int8"] = Field(
        "float32", description="word BiLSTM: int8 = eval, predict and serve run torch's dynamic-int8 LSTM kernels "
                               "(int8 weights, one scale per matrix; the weights are saved in float and training "
                               "stays float)")

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



class RecoverConfig(LoopConfig):
    """Fine-tuning after pruning, on the one loop; optionally distilled from the unpruned model or from
    a (stronger) fine-tuned teacher."""

    epochs: float = Field(1, gt=0)
    distill_from_unpruned: bool = False
    teacher: str | None = Field(None, json_schema_extra={"ref": "model"},
                                description="soft targets of this fine-tuned classifier (dir or alias), "
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



def tagged_union(members: dict[str, type[BaseModel]], key: str, default: str | None = None) -> Any:
    """`Annotated[A | B | ..., Discriminator]` of a registry {tag: config class}, discriminated on `key`
    (which may be left out when `default` is given): each member accepts only its own keys, and an
    unknown tag is one error naming the valid ones. Adding a member is one line in the registry."""
    def tag_of(value):
        return value.get(key, default) if isinstance(value, dict) else getattr(value, key, default)

    tagged = tuple(Annotated[cls, Tag(name)] for name, cls in members.items())
    return Annotated[Union[tagged], Discriminator(tag_of)]  # noqa: UP007 - a runtime-built union
