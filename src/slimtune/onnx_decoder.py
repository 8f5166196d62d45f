"""A causal LM as one ONNX graph with its KV cache, run greedily by ONNX Runtime, checked against torch.

The graph (traced from `KVCacheDecoder`):
    inputs   input_ids [batch, sequence], attention_mask [batch, past + sequence],
             position_ids [batch, sequence] (when the model takes them),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] for every layer i
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value [batch, kv_heads, past + sequence, head_dim]
Every axis but the heads and head size is dynamic, so one graph serves both phases: prefill feeds the
prompt with a past of length 0, decode feeds one token with the presents of the previous call as past.

Why a wrapper: transformers' cache objects (`DynamicCache`) are not tensors and do not trace; the wrapper
takes flat past tensors, builds the cache inside the traced call and returns the cache's tensors flat.
The TorchScript exporter (`dynamo=False`) is the one used: it traces this wrapper with transformers 5.23
and torch 2.13 (no onnxscript needed), and ONNX Runtime's quantizers want its graphs (STACK-NOTES).

`OnnxDecoder` runs such a graph with numpy and onnxruntime alone (no torch); `greedy_parity` compares
its greedy generations with transformers' `generate` token for token (the export's check).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune.errors import SlimtuneError

PAST, PRESENT = "past_key_values", "present"


def past_name(layer: int, kind: str) -> str:
    return f"{PAST}.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT}.{layer}.{kind}"


# ------------------------------------------------------------------------------------ torch side
class KVCacheDecoder(nn.Module):
    """`model` with flat tensors in and out: what `torch.onnx.export` traces (see the module docstring)."""

    def __init__(self, model: nn.Module, source: Path | str = "model"):
        super().__init__()
        self.model = model
        self.positions = "position_ids" in inspect.signature(model.forward).parameters
        self.layer_shapes = _cache_layout(model, source)  # (kv_heads, head_dim) per layer, from a real call
        self.input_names = (["input_ids", "attention_mask"] + (["position_ids"] if self.positions else [])
                            + [past_name(i, k) for i in range(len(self.layer_shapes)) for k in ("key", "value")])
        self.output_names = ["logits"] + [present_name(i, k) for i in range(len(self.layer_shapes))
                                          for k in ("key", "value")]

    def forward(self, input_ids, attention_mask, *rest):
        position_ids, past = (rest[0], rest[1:]) if self.positions else (None, rest)
        cache = _cache_of(self.model.config, past)
        kwargs = {"position_ids": position_ids} if self.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                         **kwargs)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)

    def example(self, batch: int = 2, past: int = 3, sequence: int = 4) -> tuple[torch.Tensor, ...]:
        """One traced call. No axis is 1 or 0 there, so the tracer keeps every axis symbolic (a size-1 axis
        could be baked in as a broadcast); prefill (past 0) and decode (sequence 1) are checked after export."""
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.model.config.vocab_size, (batch, sequence), generator=gen)
        mask = torch.ones(batch, past + sequence, dtype=torch.long)
        positions = [torch.arange(past, past + sequence).expand(batch, sequence)] if self.positions else []
        dtype = next(self.model.parameters()).dtype
        kv = [torch.randn(batch, heads, past, dim, generator=gen).to(dtype)
              for heads, dim in self.layer_shapes for _ in ("key", "value")]
        return (ids, mask, *positions, *kv)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "logits": {0: "batch", 1: "sequence"}}
        if self.positions:
            axes["position_ids"] = {0: "batch", 1: "sequence"}
        for name in self.input_names:
            if name.startswith(PAST + "."):
                axes[name] = {0: "batch", 2: "past_sequence"}
        for name in self.output_names[1:]:
            axes[name] = {0: "batch", 2: "total_sequence"}
        return axes


def _cache_of(config, past: tuple[torch.Tensor, ...]):
    """A DynamicCache holding `past`. The layers' tensors are set directly: `DynamicCache(ddp_cache_data=)`
    would concatenate them onto an empty 1-D tensor, a constant of the wrong rank in the traced graph."""
    from transformers import DynamicCache  # lazy: transformers loads with a model

    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        keys, values = past[2 * i], past[2 * i + 1]
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.keys, layer.values, layer.is_initialized = keys, values, True
    return cache


@torch.inference_mode()
def _cache_layout(model: nn.Module, source: Path | str) -> list[tuple[int, int]]:
    """(kv heads, head size) of each layer's cache, read from a 2-token call (pruned layers may differ).
    Refuses caches this graph cannot carry: sliding-window or other non-growing layers."""
    from transformers.cache_utils import DynamicLayer

    out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise SlimtuneError(f"{source}: the model returns no KV cache (use_cache): not exportable as a decoder")
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise SlimtuneError(f"{source}: its KV cache has {', '.join(odd)} layers (sliding-window or other "
                            "non-growing caches), which this ONNX decoder export does not carry")
    # the cache is built from the config: a config with more layers than the weights leaves some empty
    filled = [layer for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4]
    n_config = getattr(model.config, "num_hidden_layers", len(layers))
    if n_config != len(filled) or len(filled) != len(layers):
        raise SlimtuneError(f"{source}/config.json: num_hidden_layers is {n_config} but the model caches "
                            f"{len(filled)} layers")
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in filled]


@torch.inference_mode()
def torch_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> list[int]:
    """transformers' own greedy `generate` (the reference), plain argmax decoding: generate fills every
    field a passed config leaves unset from `model.generation_config` (a saved repetition penalty, suppressed
    tokens, its EOS...), so the model's is swapped for a blank one during the call."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt], dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                              pad_token_id=pad)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.generation_config = saved
    return out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- ONNX Runtime side
def open_session(path: str | Path, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session with every graph optimization, `threads` intra-op threads (one inter-op)."""
    import onnxruntime as ort  # lazy: onnxruntime costs a second to import

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if not spinning:  # idle intra-op threads sleep: on cores shared with other work, spinning halved decode
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """An exported decoder graph run by ONNX Runtime (numpy + onnxruntime only): `step` is one call (a batch
    of equal-length rows: it sends an all-ones mask, no padding), `generate` the greedy loop of one prompt that
    feeds each call's presents back as the next call's past."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort  # lazy: onnxruntime costs a second to import

        self.ort = ort
        self.path = Path(path)
        self.session = open_session(path, threads, spinning)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(PAST + ".")]
        if "input_ids" not in inputs or "attention_mask" not in inputs or not self.past_names:
            raise SlimtuneError(f"{path}: not a decoder graph with a KV cache (inputs: {', '.join(inputs)})")
        self.present_names = [PRESENT + n[len(PAST):] for n in self.past_names]
        self.positions = "position_ids" in inputs
        # [batch, kv_heads, past, head_dim]: heads and head size are fixed in the graph, the rest is dynamic
        self.past_shapes = {n: (int(inputs[n].shape[1]), int(inputs[n].shape[3])) for n in self.past_names}
        self.past_dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32
        self.outputs = ["logits", *self.present_names]

    def empty_past(self, batch: int = 1) -> list:
        """The prefill's past: every layer's keys and values with 0 positions."""
        return [self.ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, 0, d), self.past_dtype))
                for h, d in (self.past_shapes[n] for n in self.past_names)]

    def step(self, input_ids: np.ndarray, past: list, past_length: int) -> tuple[np.ndarray, list]:
        """One call: logits [batch, sequence, vocab] of `input_ids` after `past_length` cached positions, and
        the presents (OrtValues, fed back as they are: no copy through numpy between steps)."""
        batch, sequence = input_ids.shape
        feed = {"input_ids": input_ids.astype(np.int64),
                "attention_mask": np.ones((batch, past_length + sequence), np.int64)}
        if self.positions:
            feed["position_ids"] = np.broadcast_to(np.arange(past_length, past_length + sequence, dtype=np.int64),
                                                   (batch, sequence)).copy()
        values = {k: self.ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
        values.update(zip(self.past_names, past, strict=True))
        out = self.session.run_with_ort_values(self.outputs, values)
        return out[0].numpy(), list(out[1:])

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 logits_out: list | None = None) -> list[int]:
        """Greedy decoding of one prompt, as `generate(do_sample=False)`: stops after `max_new_tokens` or
        at EOS (which is kept). `logits_out` receives the logits each new token was chosen from."""
        if not prompt:
            raise SlimtuneError("the prompt is empty")
        ids, past, length, new = np.asarray([prompt], np.int64), self.empty_past(), 0, []
        for _ in range(max_new_tokens):
            logits, past = self.step(ids, past, length)
            length += ids.shape[1]
            last = logits[0, -1]
            if logits_out is not None:
                logits_out.append(last)
            token = int(last.argmax())
            new.append(token)
            if token == eos_token_id:
                break
            ids = np.asarray([[token]], np.int64)
        return new


# --------------------------------------------------------------------------------------- parity
def greedy_parity(model: nn.Module, graph: str | Path, prompts: list[list[int]], new_tokens: int,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  threads: int | None = None, references: list[list[int]] | None = None) -> dict:
    """Greedy generations of torch (`generate`) and of the graph, prompt by prompt: `identical` only when
    every prompt gives the same tokens. `max_abs_logit_diff`: the graph's logits at each chosen token
    (prefill, then decode with the cache) against torch's full forward over the same tokens. `references`:
    torch's generations when the caller already has them (a second graph of the same model)."""
    decoder = OnnxDecoder(graph, threads)
    model.eval()
    compared, differences, worst = 0, [], 0.0
    for n, prompt in enumerate(prompts, 1):
        want = (references[n - 1] if references is not None
                else torch_greedy(model, prompt, new_tokens, eos_token_id, pad_token_id))
        logits: list[np.ndarray] = []
        got = decoder.generate(prompt, new_tokens, eos_token_id, logits_out=logits)
        compared += min(len(want), len(got))
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
            differences.append(f"prompt {n}, new token {at + 1}: torch {want[at] if at < len(want) else 'stopped'}, "
                               f"onnx {got[at] if at < len(got) else 'stopped'}")
        with torch.inference_mode():  # teacher-forced on the graph's own tokens: comparable even after a split
            ref = model(input_ids=torch.tensor([prompt + got[:-1]])).logits[0, len(prompt) - 1:].float().numpy()
        worst = max(worst, float(np.abs(ref - np.stack(logits)).max()))
    return {"prompts": len(prompts), "new_tokens": new_tokens, "tokens_compared": compared,
            "identical": not differences, "first_difference": differences[0] if differences else None,
            "prompts_differing": len(differences), "max_abs_logit_diff": worst}


__all__ = ["KVCacheDecoder", "OnnxDecoder", "greedy_parity", "open_session", "past_name", "present_name",
           "torch_greedy"]
