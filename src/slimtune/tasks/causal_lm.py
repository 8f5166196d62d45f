"""`task: causal-lm` — a decoder that predicts the next token (SmolLM2, Llama-architecture models...).

Data: a text file, JSON Lines of texts, or instruction rows (slimtune.lmdata). Loss: next-token
cross-entropy over the scored tokens (the response only for instruction rows). Metric: perplexity
(primary, lower is better) = exp(mean token NLL) over every scored token of the eval text, with the
sliding window of `stride`. Speed: batch-1 prefill and KV-cached decode tokens/s. `slimtune generate`
streams text; predict returns the most likely next tokens; export writes one ONNX decoder graph with its KV
cache, checked by greedy generations identical to torch's (slimtune.onnx_decoder).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.batching import EncodedDataset, batch_indices, model_inputs
from slimtune.config import CausalLMData, Preprocessing
from slimtune.data import TaskData
from slimtune.distributed import all_reduce_sum, device_of, eval_rows, to_device
from slimtune.errors import SlimtuneError
from slimtune.evaluate import measure_generation_speed
from slimtune.lmdata import (
    IGNORE_INDEX,
    collate_lm,
    examples_dataset,
    prepare_lm_data,
    prompt_text,
    read_lm_tokens,
    scored_tokens,
    windows,
)
from slimtune.models import load_causal_lm
from slimtune.onnx_decoder import KVCacheDecoder, greedy_parity, torch_greedy
from slimtune.tasks.base import EvalFn, Metric, OnnxSignature

DEFAULT_BLOCK = 512  # eval window of a model without a saved record
FEW_EVAL_TOKENS = 4096  # below this many scored tokens a perplexity moves by several percent between texts
EVAL_BATCH = 4  # windows per forward: the logits of 512 tokens x 49k vocabulary are 100 MB each
# the export's check: greedy generations of torch and of the ONNX graph, token for token
PARITY_PROMPTS = ("List five facts about the ocean.", "Write a short story about a lighthouse keeper.",
                  "Explain how a bicycle stays upright.")  # long answers: EOS comes after the compared tokens
PARITY_NEW_TOKENS = 24


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed NLL, count) of the batch's scored tokens: position t predicts token t+1."""
    logits = model(**model_inputs(batch)).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())


@torch.inference_mode()
def perplexity(model: nn.Module, ds: EncodedDataset, pad_id: int, batch_size: int = EVAL_BATCH) -> dict:
    """Perplexity, mean NLL and scored-token count of `ds` (eval windows or instruction rows). Under torchrun
    each rank scores its share of the windows and the sums are added up."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    shard = eval_rows(len(ds), pad=False)  # sums: no padding, so no window counts twice
    part = ds if shard is None else ds.subset(shard)
    total, count = 0.0, 0
    try:
        for idx in batch_indices(part.lengths, batch_size, shuffle=False) if len(part) else []:
            nll, n = token_nll(model, to_device(collate_lm(part, idx, pad_id), device))
            total, count = total + float(nll), count + n
    finally:
        model.train(was_training)
    if shard is not None:
        total, count = all_reduce_sum([total, float(count)])
        count = int(count)
    mean = total / max(count, 1)
    return {"perplexity": math.exp(mean) if count else None, "nll": mean, "eval_tokens": count}


class CausalLM:
    name: ClassVar[str] = "causal-lm"
    primary: ClassVar[Metric] = Metric("perplexity", higher_is_better=False)
    final_keys: ClassVar[tuple[str, ...]] = ("perplexity", "nll", "eval_tokens")
    speed_keys: ClassVar[tuple[str, ...]] = ("prefill_tokens_per_s", "decode_tokens_per_s")
    loop_metrics: ClassVar[dict[str, bool]] = {"perplexity": False, "loss": False}
    data_config: ClassVar[type] = CausalLMData
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    new_head: ClassVar[bool] = False
    # "stage" or "stage:method". Structured pruning (BERT heads and neurons), weight-only quantization
    # with a decode kernel open here once measured
    supported_stages: ClassVar[tuple[str, ...] | None] = ("finetune", "evaluate", "prune:magnitude",
                                                          "prune:activation", "prune:sparsegpt",
                                                          "quantize:weight_only", "distill")
    soft_targets: ClassVar[str] = "token"  # 49,152 probabilities per token: the teacher runs online
    # weight-only MatMulNBits graphs (slimtune.onnx_nbits): ORT decodes them 2.3-5x faster than torch fp32
    onnx_quantize: ClassVar[tuple[str, ...]] = ("int8", "int4")

    def output_space(self, data: CausalLMData, start: Path | None = None) -> dict[int, str]:
        return {}  # the vocabulary is the model's own

    def start_note(self, start: Path, outputs: dict[int, str]) -> str | None:
        return None  # the language-model head is always the model's own

    def preprocessing(self, data: CausalLMData) -> Preprocessing:
        # max_length carries the block size: the window eval and generate read it back
        return Preprocessing(max_length=min(data.block_size, 8192), text_field=data.text_field, clean=data.clean)

    def load_pretrained(self, path: Path, outputs: dict[int, str]) -> nn.Module:
        return load_causal_lm(path)

    def model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_data(self, data: CausalLMData, tokenizer, outputs: dict[int, str],
                     embedding_weight: torch.Tensor | None = None, model_config: Any = None) -> TaskData:
        context = getattr(model_config, "max_position_embeddings", None)
        return prepare_lm_data(data, tokenizer, context)

    def eval_dataset(self, path: Path, tokenizer, model_config: Any, pre: Preprocessing,
                     limit: int | None = None, stride: int | None = None) -> EncodedDataset:
        block, clean = pre.max_length, pre.clean
        if "slimtune_preprocessing" not in (model_config.to_dict() if hasattr(model_config, "to_dict") else {}):
            # a model slimtune did not train: a 512-token window (or its whole context, if shorter), and the
            # text as a recipe's LM data reads it by default (uncleaned: newlines are part of the text)
            block = min(DEFAULT_BLOCK, getattr(model_config, "max_position_embeddings", None) or DEFAULT_BLOCK)
            clean = CausalLMData.model_fields["clean"].default
        if stride is not None and stride > block:
            raise SlimtuneError(f"--stride {stride}: larger than the eval window of {block} tokens (tokens "
                                "between windows would never be scored)")
        cfg = CausalLMData(train=path, text_field=pre.text_field, clean=clean, block_size=block)
        tokens = read_lm_tokens(path, cfg, tokenizer, limit)
        if tokens.stream is None:  # instruction rows: the responses' perplexity
            return examples_dataset(tokens.examples, block)
        return windows(tokens.stream, block, stride)

    def collate(self, ds: EncodedDataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_lm(ds, indices, pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nll, count = token_nll(model, batch)
        return nll / max(count, 1)

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # a mean over scored tokens, as token_nll

    def distill_rows(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # as token_nll: position t predicts token t+1; only scored targets (not padding, not prompts)
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE_INDEX
        return logits[:, :-1][scored], targets[scored]

    def eval_fn(self, ds: EncodedDataset, pad_id: int) -> EvalFn:
        def evaluate(model: nn.Module) -> dict:
            m = perplexity(model, ds, pad_id)
            return {"loss": m["nll"], "perplexity": m["perplexity"]}

        return evaluate

    def evaluate(self, model: nn.Module, ds: EncodedDataset, outputs: dict[int, str], pad_id: int) -> dict:
        return perplexity(model, ds, pad_id) | {"eval_windows": len(ds)}

    def measure_speed(self, model: nn.Module, ds: EncodedDataset, pad_id: int, latency_runs: int = 3,
                      throughput_batches: int = 10, threads: int | None = None) -> dict:
        """A 128-token prompt from the eval text, then 32 decoded tokens; the median of up to 3 runs
        (`latency_runs`; each already times 160 tokens). `throughput_batches` has no meaning here."""
        prompt = next((ids for ids in ds.input_ids if len(ids) >= 128), max(ds.input_ids, key=len))[:128]
        return measure_generation_speed(model, prompt, new_tokens=32, runs=min(latency_runs, 3), threads=threads)

    def predictions(self, logits: torch.Tensor, outputs: dict[int, str]) -> list[dict]:
        """The five most likely next tokens (ids and probabilities) after each sequence."""
        probs = torch.softmax(logits[:, -1].float() if logits.dim() == 3 else logits.float(), dim=-1)
        top = probs.topk(5, dim=-1)
        return [{"next_token_ids": ids.tolist(), "probabilities": [round(float(p), 6) for p in ps]}
                for ids, ps in zip(top.indices, top.values, strict=True)]

    def onnx_signature(self, model: nn.Module, tokenizer, source: Path) -> OnnxSignature:
        """A decoder with its KV cache in the graph (slimtune.onnx_decoder), checked by its greedy
        generations: they must equal torch's token for token on PARITY_PROMPTS."""
        decoder = KVCacheDecoder(model, source)
        prompts = parity_prompts(tokenizer)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        references: list[list[int]] = []  # torch's generations: the same for every graph checked (fp32, int4...)

        def check(graph: Path, threads: int | None) -> dict:
            if not references:
                references.extend(torch_greedy(model, p, PARITY_NEW_TOKENS, eos, pad) for p in prompts)
            return greedy_parity(model, graph, prompts, PARITY_NEW_TOKENS, eos, pad, threads, references)

        return OnnxSignature(decoder, decoder.example(), decoder.input_names, decoder.output_names,
                             decoder.dynamic_axes(), check=check, pad_tokenizer=False)

    def write_artifacts(self, final: dict, out: Path) -> list[str]:
        return []

    def compare_outputs(self, reference: np.ndarray, candidate: np.ndarray, ds: EncodedDataset,
                        labelled: bool) -> dict:
        ref, cand = reference.argmax(-1), candidate.argmax(-1)
        return {"rows": int(ref.size), "agreement": float((ref == cand).mean()) if ref.size else 1.0,
                "changed": int((ref != cand).sum())}

    def warnings(self, final: dict) -> list[str]:
        ppl, tokens = final.get("perplexity"), final.get("eval_tokens") or 0
        out = []
        if ppl is None or not math.isfinite(ppl):
            out.append(f"perplexity is {ppl}: the model's outputs overflow or nothing was scored")
        if tokens < FEW_EVAL_TOKENS:
            out.append(f"the perplexity rests on only {tokens} tokens: give data.eval a longer text "
                       f"(thousands of tokens) before comparing models")
        return out


def parity_prompts(tokenizer) -> list[list[int]]:
    """PARITY_PROMPTS as `slimtune generate` sends them: through the chat template when there is one."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return [tokenizer(prompt_text(p, tokenizer) if templated else p, add_special_tokens=not templated)["input_ids"]
            for p in PARITY_PROMPTS]


__all__ = ["CausalLM", "perplexity", "scored_tokens", "token_nll"]
