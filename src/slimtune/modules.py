"""Finding and replacing modules by name: the lookup every compression method shares.

A pattern is `re:<regex>` (matched from the start of the module name, as in llm-compressor), a class name
(`Linear`), or a module name or dotted suffix (`query` matches `...self.query`).
"""

from __future__ import annotations

import re

from torch import nn

from slimtune.adapt.layers import anatomy
from slimtune.errors import SlimtuneError

HEAD_NAMES = re.compile(r"(^|\.)(classifier|pooler|lm_head|score|embeddings)(\.|$)")


def module_at(model: nn.Module, path: str, what: str = "module") -> nn.Module:
    """`model.get_submodule(path)`, with a one-line error naming the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SlimtuneError(f"{what}: module '{path}' not found in {type(model).__name__}") from None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the module at `path` was (its parent's attribute or list slot)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def select_linears(model: nn.Module, targets: list[str] | None = None,
                   ignore: list[str] | None = None, purpose: str = "prune") -> dict[str, nn.Linear]:
    """The `nn.Linear` modules to `purpose` (prune, quantize, factorise...), by name.

    A pattern is `re:<regex>` (matched from the start of the module name, as in llm-compressor), a
    class name (`Linear`), or a module name or dotted suffix (`query` matches `...self.query`).
    Default targets: every Linear inside the transformer layer stack, so the classifier, pooler,
    embeddings and lm_head are left alone.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise SlimtuneError(f"{type(model).__name__} has no nn.Linear module to {purpose}")
    if targets is None:
        chosen = _layer_stack_linears(model, linears)
    else:
        unmatched = [p for p in targets if not any(_matches(p, n, m) for n, m in linears.items())]
        if unmatched:
            raise SlimtuneError(f"targets {unmatched} match no nn.Linear module "
                                f"(examples: {', '.join(list(linears)[:3])})")
        chosen = {n: m for n, m in linears.items() if any(_matches(p, n, m) for p in targets)}
    chosen = {n: m for n, m in chosen.items() if not any(_matches(p, n, m) for p in ignore or ())}
    if not chosen:
        raise SlimtuneError(f"ignore {ignore} leaves no nn.Linear module to {purpose}")
    return chosen


def _layer_stack_linears(model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    try:
        prefix = anatomy(model).layers + "."
    except SlimtuneError:  # not a transformer we recognise: every Linear but the head-like ones
        return {n: m for n, m in linears.items() if not HEAD_NAMES.search(n)}
    return {n: m for n, m in linears.items() if n.startswith(prefix)}


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        try:
            return re.match(pattern[3:], name) is not None
        except re.error as e:
            raise SlimtuneError(f"pattern {pattern!r} is not a valid regex ({e})") from None
    if pattern in {t.__name__ for t in type(module).__mro__}:
        return True
    return name == pattern or name.endswith("." + pattern)
