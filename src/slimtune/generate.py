"""`slimtune generate MODEL_DIR "prompt"`: text from a causal LM, streamed token by token to stdout.

transformers' `generate` does the decoding (KV cache, temperature / top-p / top-k sampling, greedy at
temperature 0) and its `TextStreamer` prints each piece as soon as it decodes to whole characters. An
exported ONNX directory (`slimtune export`, e.g. an int4 MatMulNBits decoder) decodes on ONNX Runtime:
`generate` needs a torch model, so that loop is written here, with transformers' own logits warpers in
`generate`'s order (temperature, top-k, top-p) and the same seeded `torch.multinomial` draw. An
instruct model's prompt goes through its chat template (`--raw` sends the text as it is), and the
model's saved preprocessing record cleans the prompt as its training text was cleaned.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from slimtune.config import names_causal_lm
from slimtune.data import preprocessor_for
from slimtune.errors import SlimtuneError
from slimtune.graph_model import GraphModel, load_runnable, runnable_path
from slimtune.lmdata import prompt_text
from slimtune.models import load_tokenizer, preprocessing_of, read_config


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0


class Generator:
    """A causal LM and its tokenizer, loaded once for any number of prompts."""

    def __init__(self, model_dir: str | Path, raw: bool = False, threads: int | None = None):
        path = runnable_path(model_dir)
        if not names_causal_lm(read_config(path)):
            raise SlimtuneError(f"{path}: not a causal language model (its config names no *ForCausalLM "
                                "architecture); a classifier answers `slimtune predict`")
        self.model = load_runnable(path, threads)
        self.tokenizer = load_tokenizer(path)
        self.preprocess = preprocessor_for(preprocessing_of(path))
        self.templated = bool(getattr(self.tokenizer, "chat_template", None)) and not raw
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def encode(self, prompt: str, max_new_tokens: int):
        text = self.preprocess(prompt)
        text = prompt_text(text, self.tokenizer) if self.templated else text
        ids = self.tokenizer(text, add_special_tokens=not self.templated, return_tensors="pt")["input_ids"]
        if self.context and ids.shape[1] + max_new_tokens > self.context:
            raise SlimtuneError(f"the prompt has {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} "
                                f"that exceeds the model's context of {self.context} tokens")
        if ids.shape[1] == 0:
            raise SlimtuneError("the prompt is empty")
        return ids

    def __call__(self, prompt: str, sampling: Sampling, out: TextIO | None = None) -> str:
        """Generate for one prompt, streaming to `out` (stdout by default); returns the new text."""
        import torch  # lazy: the CLI's --help must not load torch

        ids = self.encode(prompt, sampling.max_new_tokens)
        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        out = out or sys.stdout
        streamer = _Streamer(self.tokenizer, out)
        eos = self.tokenizer.eos_token_id
        if isinstance(self.model, GraphModel):
            return self.tokenizer.decode(self._graph_generate(ids, sampling, streamer, eos), skip_special_tokens=True)
        with torch.inference_mode():
            generated = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                **({"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
                   if sample else {"temperature": None, "top_p": None, "top_k": None}),
                streamer=streamer, pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id
                is not None else eos, eos_token_id=eos)
        return self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)

    def _graph_generate(self, ids, sampling: Sampling, streamer, eos: int | None) -> list[int]:
        """`generate`'s loop on an exported graph: prefill, then one token per call with the graph's KV
        cache; greedy at temperature 0, else sampled from the warped distribution."""
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList()
        if sampling.temperature > 0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        streamer.put(ids)  # the prompt: skipped by the streamer, as generate() sends it
        new: list[int] = []
        cache, step = None, ids
        with torch.inference_mode():
            for _ in range(sampling.max_new_tokens):
                out = self.model(input_ids=step, past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1].float()
                if sampling.temperature > 0:
                    scores = warpers(torch.tensor([ids[0].tolist() + new]), logits)
                    token = int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0])
                else:
                    token = int(logits.argmax(-1)[0])
                new.append(token)
                streamer.put(torch.tensor([token]))
                if token == eos:
                    break
                step = torch.tensor([[token]])
        streamer.end()
        return new


def _Streamer(tokenizer, out: TextIO):  # noqa: N802  (a class factory: TextStreamer loads transformers)
    """transformers' TextStreamer, writing to `out` instead of print()'s stdout."""
    from transformers import TextStreamer

    class ToStream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)
