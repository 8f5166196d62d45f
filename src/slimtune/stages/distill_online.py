"""`stage: distill` for tasks whose soft targets are per token (`Task.soft_targets == "token"`, a causal LM).

Not a stage of its own: the distill stage hands over here when the run's task says its output
distributions are too large to cache. Order of work: check the options, the teachers (models of the
run's task) and the student against one shared vocabulary from configs and tokenizers (before OUT
exists); then load the teachers frozen, build the student (the run's model, another directory of the
task, or a layer selection such as 30 -> 20 decoder layers), measure both on the eval split, train the
student on the run's data with `distill.online.row_distill_loss` (the teachers run on every batch),
and make the student the run's model. The data is not re-encoded: the student shares its vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.distill.online import check_shared_vocabulary, load_online_teachers, row_distill_loss
from slimtune.distill.students import CURRENT, Student, build_student, student_blueprint
from slimtune.distill.teachers import Teacher
from slimtune.errors import SlimtuneError
from slimtune.models import load_tokenizer, read_config, resolve_model_path
from slimtune.stages.base import Run, console, count_params, trainable_record
from slimtune.tasks import task_of_model
from slimtune.train import seed_everything

# StudentSpec keys that only shape a word-level student
WORD_STUDENT_KEYS = ("hidden", "embed_dim", "init_embeddings", "embedding_layer", "extend_vocab", "extra_words",
                     "pca_dims", "max_vocab", "dropout")


def online_option_problem(cfg) -> str | None:
    """The first distill key (path and why) that per-token distillation cannot honour; None when all fit.
    Checked when the recipe is read, before any model loads."""
    student = cfg.student
    if student.arch is not None:
        return (f"student.arch: a word-level {student.arch} student classifies whole texts; per-token "
                "distillation needs a decoder student (the run's model, `from`, or `layers`)")
    word_keys = [k for k in WORD_STUDENT_KEYS if k in student.model_fields_set]
    if word_keys:
        return f"student.{word_keys[0]}: a key of word-level students only (student.arch)"
    if cfg.transfer_augment is not None:
        return ("transfer_augment: EDA copies of whole texts labelled by a teacher are for per-example targets; "
                "here the teacher already labels every token of every train block")
    if cfg.combine == "best":
        return ("combine: 'best' picks, per example, the teacher that gets its label right; per-token targets "
                "have no such label: use combine: weighted")
    if cfg.soft_loss != "kl":
        return (f"soft_loss: '{cfg.soft_loss}' matches the logits of small non-transformer students; per-token "
                "distillation uses kl")
    if cfg.intermediate is not None:
        return "intermediate: hidden-state and attention matching is not available for per-token distillation yet"
    if cfg.cache is not None:
        return "cache: per-token teacher outputs are never cached (the teachers run on each batch); remove it"
    return None


def _check_task(run: Run, name: str, path, who: str) -> None:
    theirs = task_of_model(read_config(path))
    if type(theirs) is not type(run.task):
        raise SlimtuneError(f"{who} '{name}': a {theirs.name} model; this run distils a {run.task.name} model "
                            "from models of the same task")


def validate_online(run: Run, cfg) -> None:
    """Every input error, from configs and tokenizers: teachers and student of the run's task, one
    vocabulary for teachers, student and the run's data."""
    from transformers import AutoConfig

    problem = online_option_problem(cfg)
    if problem:
        raise SlimtuneError(problem)
    teachers = []
    for spec in cfg.teachers():
        path = resolve_model_path(spec.path)
        _check_task(run, spec.path, path, "teacher")
        teachers.append((spec.path, load_tokenizer(path), AutoConfig.from_pretrained(path, local_files_only=True)))
    if cfg.student.from_ and cfg.student.from_ != CURRENT:
        _check_task(run, cfg.student.from_, resolve_model_path(cfg.student.from_), "student")
    first = resolve_model_path(cfg.teachers()[0].path)
    _, config, tokenizer = student_blueprint(cfg.student, current_config=run.model.config,
                                             current_tokenizer=run.tokenizer, teacher_path=first,
                                             teacher_tokenizer=teachers[0][1])
    check_shared_vocabulary(tokenizer, config, teachers, data_tokenizer=run.tokenizer)


@dataclass
class OnlineSetup:
    teachers: list[Teacher]
    student: Student


def setup_online(run: Run, cfg) -> OnlineSetup:
    load = lambda path: run.task.load_pretrained(path, run.data.labels)  # noqa: E731 - the task's own loader
    teachers = load_online_teachers(cfg.teachers(), load)
    first = teachers[0]
    seed_everything(cfg.seed)
    student = build_student(cfg.student, current=run.model, current_tokenizer=run.tokenizer,
                            teacher_model=first.model, teacher_tokenizer=first.tokenizer,
                            id2label=run.data.labels, texts=[], teacher_path=first.path, load=load)
    student.model.requires_grad_(True)  # a layer selection copies the (frozen) teacher
    if cfg.student.freeze_embeddings:
        student.model.get_input_embeddings().requires_grad_(False)
    return OnlineSetup(teachers, student)


def adopt_online_student(run: Run, setup: OnlineSetup) -> None:
    """The student becomes the run's model; the data stays (same vocabulary), its tokenizer is saved."""
    run.model, run.tokenizer = setup.student.model, setup.student.tokenizer
    for p in run.model.parameters():
        p.requires_grad_(True)


def rebuild_online(run: Run, cfg) -> None:
    adopt_online_student(run, setup_online(run, cfg))


def run_online(run: Run, cfg) -> dict:
    setup = setup_online(run, cfg)
    for t in setup.teachers:  # built on the CPU with the student; they run where it trains
        t.model.to(run.device)
    student, primary = setup.student, run.task.primary.name
    evaluate = run.eval_fn(run.data.eval)  # reported figures: the eval split
    teacher_metric = {t.name: evaluate(t.model)[primary] for t in setup.teachers}  # for "% of teacher"
    start = evaluate(student.model)[primary]
    console.print(f"distill: {student.source}, {primary} {_fmt(start)} before training; teachers "
                  + ", ".join(f"{name} {_fmt(value)}" for name, value in teacher_metric.items()))
    trainable = trainable_record(student.model)
    loss_fn = row_distill_loss(setup.teachers, run.task.distill_rows, cfg.temperature, cfg.alpha)
    lr, bs = run.resolve_auto(cfg, student.model, loss_fn)
    res = run.fit(student.model, cfg, lr=lr, batch_size=bs, loss_fn=loss_fn)
    adopt_online_student(run, setup)
    return {"stage": "distill", "student": student.kind, "student_source": student.source,
            "teachers": [{"model": t.name, "weight": t.weight, "params": count_params(t.model),
                          f"dev_{primary}": teacher_metric[t.name]} for t in setup.teachers],
            "combine": cfg.combine, "temperature": cfg.temperature, "alpha": cfg.alpha, "soft_loss": cfg.soft_loss,
            "soft_targets": run.task.soft_targets, "intermediate": None, f"start_{primary}": start,
            "transfer_rows": len(run.data.train), "augmented_transfer_rows": 0,
            **trainable, **res.summary()}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
