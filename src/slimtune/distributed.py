"""Devices and data-parallel training: everything that knows about processes, ranks and accelerators.

One run is N processes launched by `torchrun` (or `accelerate launch`, or `slimtune run --nproc N`, which
calls torchrun's launcher): each holds the whole model, reads the same recipe and data, and takes its share
of every global batch. They run the same code in the same order, so every collective call below is made by
every rank; only rank 0 writes files (checkpoints, the model, metrics, reports, TensorBoard).

Why torch.distributed directly, not DDP's wrapper nor accelerate's `Accelerator`: the one loop's losses call
the model in many ways (distillation calls `model.student` and its projections, online teachers run inside
the loss, gradual pruning masks weights between steps, a rank may get no example of a short last batch).
DDP only synchronises gradients of forwards that go through its wrapper, and fails on parameters a step
leaves unused unless it searches the graph every step; `Accelerator.prepare` wraps the model the same way.
So the loop averages the gradients itself, once per optimizer step after the last micro-batch (DDP's
`no_sync` accumulation): the sum over ranks divided by the world size, in flat buckets, exactly DDP's
arithmetic, with no constraint on the loss. DDP's one advantage, overlapping the all-reduce with the
backward pass, buys little on CPUs, where both compete for the same cores.

Sharding rules (what makes N processes equal one):
- training: the global batch (`batch_size`, the same at any N) is cut into N contiguous parts; each rank's
  mean loss is weighted by its share of the rows, so the averaged gradient is the global batch's gradient
  (exactly, for a per-row mean loss and equal parts). The batch order is the one-process order: a
  checkpoint holds the global step and the data order only, and resumes on any number of processes;
- evaluation: rows dealt round-robin (`DistributedSampler`'s rule), the last shard padded with repeated rows
  so the gathered tensors have one shape, the repeats dropped after gathering; sums are reduced unpadded.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from slimtune.errors import SlimtuneError

T = TypeVar("T")
# A collective that waits longer than this fails the job instead of hanging it (a rank that hangs rather
# than dies; a rank that dies is seen by torchrun's agent within a second). Rank 0's final measurement and
# ONNX export run while the others wait, so it must outlast them: 30 min unless SLIMTUNE_DIST_TIMEOUT says.
DEFAULT_TIMEOUT_S = 1800
BUCKET_BYTES = 32 << 20  # gradients are all-reduced in flat buckets of about this size (DDP's default is 25 MB)
TEST_EXIT_ENV = "SLIMTUNE_TEST_EXIT_AT"  # "RANK:STEP": that rank os._exit(1)s after that optimizer step (tests)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world = World()
_local_depth = 0  # > 0 inside `local()`: this rank works alone, collectives are skipped


def env_world() -> World:
    """The world torchrun / accelerate launch describe in the environment (one process without them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str | None = "auto") -> torch.device:
    """Join the process group the environment describes (once per process) and return this rank's device.
    The backend follows the device: nccl on CUDA, gloo on CPU."""
    global _world
    world = env_world()
    dev = resolve_device(device, world)
    if world.size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=float(os.environ.get("SLIMTUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(leave)
    _world = world if world.size > 1 else World()
    return dev


def leave() -> None:
    """Leave the process group (at exit, registered by `init`), so that its threads are stopped before the
    interpreter tears down. Processes that skip atexit (multiprocessing children) call it themselves. It does not
    by itself stop the rare SIGABRT at exit seen in spawned test workers (tests/dist_workers.py)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> World:
    return _world


def is_main() -> bool:
    return _world.is_main


def active() -> bool:
    """Whether collectives run: several processes, and not inside `local()`."""
    return _world.size > 1 and _local_depth == 0 and dist.is_initialized()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """This rank works alone inside (rank 0 writing outputs): evaluation is not sharded, nothing waits."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def barrier() -> None:
    if active():
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 alone (inside `local()`) while the others wait; every rank returns its result. An
    error on rank 0 is raised on every rank, so none waits for a result that never comes."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            with local():
                box[0] = ("ok", fn())
        except BaseException as e:
            dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise SlimtuneError(f"rank 0 failed: {value}")
    return value


def once_per_node(fn: Callable[[], None]) -> None:
    """`fn()` by one process per machine (local rank 0), which writes a file the others then read; the
    others wait. On one machine or a shared filesystem this computes once; on several machines without one,
    once per machine. A failure fails every rank."""
    if not active():
        fn()
        return
    ok = torch.ones(1, device=_comm_device())
    error: BaseException | None = None
    if _world.local_rank == 0:
        try:
            with local():
                fn()
        except BaseException as e:
            ok.zero_()
            error = e
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if not ok.item():
        raise SlimtuneError("another rank failed to compute what this one waits for (see its error)")


# ------------------------------------------------------------------ training: batches and gradients
def rank_rows(indices: list[int], w: World | None = None) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one; a rank beyond the
    batch's length gets none)."""
    w = w or _world
    if w.size == 1:
        return indices
    return [int(i) for i in np.array_split(np.asarray(indices, dtype=np.int64), w.size)[w.rank]]


def average_gradients_(params: list[torch.nn.Parameter], loss: float) -> float:
    """Average the gradients of `params` over the ranks (a rank without a gradient for a parameter counts as
    zero; a parameter no rank has a gradient for keeps None, as in one process) and return the mean of
    `loss` over the ranks. No-op in one process."""
    if not active():
        return loss
    size = _world.size
    device = params[0].device if params else torch.device("cpu")
    had = torch.tensor([float(p.grad is not None) for p in params] + [loss], dtype=torch.float64, device=device)
    dist.all_reduce(had)
    bucket: list[torch.nn.Parameter] = []
    nbytes = 0
    for p in params:
        if bucket and (p.dtype != bucket[0].dtype or p.device != bucket[0].device):  # one flat tensor per dtype
            _reduce_bucket(bucket, size)
            bucket, nbytes = [], 0
        bucket.append(p)
        nbytes += p.numel() * p.element_size()
        if nbytes >= BUCKET_BYTES:
            _reduce_bucket(bucket, size)
            bucket, nbytes = [], 0
    if bucket:
        _reduce_bucket(bucket, size)
    for p, flag in zip(params, had[:-1].tolist(), strict=True):
        if flag == 0:
            p.grad = None  # no rank computed one: AdamW skips it, as it does in one process
    return float(had[-1].item()) / size


def _reduce_bucket(bucket: list[torch.nn.Parameter], size: int) -> None:
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
    dist.all_reduce(flat)
    flat.div_(size)
    offset = 0
    for p in bucket:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_module_(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def exit_hook(step: int) -> None:
    """Tests: `SLIMTUNE_TEST_EXIT_AT=RANK:STEP` makes that rank die (os._exit(1)) after that step."""
    spec = os.environ.get(TEST_EXIT_ENV)
    if spec and spec == f"{_world.rank}:{step}":
        print(f"rank {_world.rank}: {TEST_EXIT_ENV}={spec}: exiting", file=sys.stderr, flush=True)
        os._exit(1)


# ------------------------------------------------------------------ evaluation: shards and gathering
def eval_rows(n: int, pad: bool) -> list[int] | None:
    """This rank's rows of an `n`-row evaluation, dealt round-robin (None: not sharded). With `pad`, every
    rank gets ceil(n / size) rows, the last ones repeated from the start (for `gather_rows`)."""
    if not active() or n == 0:
        return None
    size, rank = _world.size, _world.rank
    if not pad:
        return list(range(rank, n, size))
    per = -(-n // size)
    return [i % n for i in range(rank, per * size, size)]


def gather_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """Every rank's `eval_rows(n, pad=True)` results, back in dataset order with the repeats dropped."""
    size = _world.size
    local_rows = torch.from_numpy(np.ascontiguousarray(rows)).to(_comm_device())
    parts = [torch.empty_like(local_rows) for _ in range(size)]
    dist.all_gather(parts, local_rows)
    # row j of rank r is dataset row j * size + r
    stacked = torch.stack(parts, dim=1).reshape(-1, *local_rows.shape[1:])
    return stacked[:n].cpu().numpy()


def all_reduce_sum(values: list[float]) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _comm_device() -> torch.device:
    """Where collective tensors live: the GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------ devices and precision
def resolve_device(spec: str | None = "auto", w: World | None = None) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`; a process of a multi-GPU job
    takes the GPU of its local rank."""
    w = w or env_world()
    spec = spec or "auto"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if spec not in ("auto", "cuda") and not spec.startswith("cuda:"):
        raise SlimtuneError(f"device {spec}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SlimtuneError(f"device {spec}: no CUDA device on this machine (use device: auto or cpu)")
    index = int(spec.split(":", 1)[1]) if ":" in spec else (w.local_rank if w.size > 1 else 0)
    if index >= torch.cuda.device_count():
        raise SlimtuneError(f"device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch's tensors on `device` (a no-op where they already are, so CPU runs pay nothing)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v
            for k, v in batch.items()}


# CPU flags of native bf16 arithmetic: AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, Zen 4) and
# AMX bf16 tiles (Sapphire Rapids on). oneDNN runs autocast's bf16 matmuls on them; without them bf16 is
# emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
PRECISIONS = ("auto", "fp32", "bf16")  # the loop's `precision:` key


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags (BF16_CPU_FLAGS) of this CPU, read from /proc/cpuinfo (or the given text of
    it); none where it cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_CPU_FLAGS if f in flags]


# `precision: auto` on a CPU with native bf16 takes bf16 autocast for models at least this wide (hidden size):
# MiniLM (384) fine-tuned on SST-2 took 201 ms a step against 315 ms in fp32 at equal dev accuracy (2 threads,
# AMX; bench/finetune_speed.py), while on a hidden-32 model the casts cost more than its small matmuls save
BF16_MIN_WIDTH = 256


def model_width(model) -> int | None:
    """The hidden size a model's config declares (None for models without one: word-level students)."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    return int(width) if isinstance(width, int) else None


def precision_for(device: torch.device, requested: str | None = "auto", width: int | None = None) -> str | None:
    """The loop's mixed precision on `device`: None (fp32), "bf16" or "fp16". `requested` is the loop's
    `precision:` key: fp32 and bf16 are obeyed; auto (or None) is, on CUDA, bf16 autocast where the GPU has
    it, else fp16 with a GradScaler; on a CPU with native bf16 (avx512_bf16 / AMX), bf16 autocast for a model of
    hidden size `width` >= BF16_MIN_WIDTH, else fp32. The weights, gradients and AdamW stay fp32."""
    if requested == "fp32":
        return None
    if requested in ("bf16", "fp16"):
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_flags() and (width or 0) >= BF16_MIN_WIDTH else None


def describe_precision(device: torch.device, precision: str | None, requested: str | None = "auto",
                       bf16_flags: list[str] | None = None, width: int | None = None) -> str:
    """What the run records and the progress line says: "bf16 autocast (avx512_bf16, amx_bf16)",
    "fp32 (no bf16 in this CPU)", "fp32 (precision: fp32)"..."""
    if device.type == "cuda":
        return {None: "fp32 (precision: fp32)", "bf16": "bf16 autocast (cuda)",
                "fp16": "fp16 autocast + loss scaling (cuda)"}[precision]
    flags = cpu_bf16_flags() if bf16_flags is None else bf16_flags
    if precision is None:
        if requested == "fp32":
            return "fp32 (precision: fp32)"
        if not flags:
            return "fp32 (no bf16 in this CPU)"
        why = (f"hidden size {width} < {BF16_MIN_WIDTH}: bf16 casts would cost more than they save" if width
               else f"the model declares no hidden size, and auto takes bf16 only from {BF16_MIN_WIDTH}")
        return f"fp32 (precision: auto; {why}; `precision: bf16` forces it)"
    if precision == "bf16" and flags:
        return f"bf16 autocast ({', '.join(flags)})"
    return f"{precision} autocast (precision: {precision}; no native {precision} in this CPU: emulated, slow)"


def loop_precision(device: torch.device, requested: str | None = "auto",
                   width: int | None = None) -> tuple[str | None, str]:
    """(precision, description) of a training loop of a model of hidden size `width`. Under torchrun, `auto` is
    agreed by every rank: bf16 only if every rank's device has it (one curve, whatever machine each rank runs on)."""
    precision = precision_for(device, requested, width)
    if requested in (None, "auto") and active():
        if all_reduce_sum([1.0 if precision == "bf16" else 0.0])[0] != _world.size:
            return None, "fp32 (not every rank's device has bf16)"
    return precision, describe_precision(device, precision, requested, width=width)


def autocast(device: torch.device, precision: str | None):
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str | None):
    """fp16 needs its loss scaled (bf16 has fp32's range); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# ------------------------------------------------------------------ launching
def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_nproc(nproc: int, device: str | None) -> None:
    """Refuse a process count this machine cannot run: below 1, more than its CPU cores (on CPU), more than
    its GPUs (on CUDA)."""
    if nproc < 1:
        raise SlimtuneError(f"--nproc {nproc}: expected 1 or more processes")
    gpu = device not in ("cpu",) and torch.cuda.is_available()
    if gpu and device not in (None, "auto", "cuda"):
        raise SlimtuneError(f"--nproc {nproc} with --device {device}: several processes take one GPU each "
                            "(use --device cuda)")
    limit, what, unit = (torch.cuda.device_count(), "CUDA devices", "GPU") if gpu else (cpu_cores(), "CPU cores",
                                                                                          "core")
    if nproc > limit:
        raise SlimtuneError(f"--nproc {nproc}: this machine has {limit} {what}; at most one process per {unit}")


def launch(nproc: int, args: list[str]) -> None:
    """`python -m slimtune ARGS` in `nproc` local processes under torchrun's elastic agent, never restarted:
    a rank that dies stops the others at once and the job fails with one line naming it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # each process gets its share of the cores (torchrun sets 1; on a 2-core machine that is the same)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"slimtune-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "slimtune", *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        raise LaunchFailed(f"rank {rank} (pid {failure.pid}) {how}; the job's other processes were stopped "
                           "(its own error is above)") from None


class LaunchFailed(Exception):
    """A process of a launched job failed (its own error was printed by it)."""
