"""Which parameters are prunable: by default the weights of Linear and Conv layers,
including the transposed linear layer of GPT-2 (``transformers.pytorch_utils.Conv1D``).

Biases and norm parameters are never pruned by default; embeddings and an output head
(tied to an embedding, returned by ``get_output_embeddings()``, or named ``lm_head``) are
excluded, as Wanda and SparseGPT do. ``include``/``exclude`` take fnmatch patterns on
parameter names and only narrow the candidates: ``include`` keeps those it matches,
``exclude`` removes names. Anything else (a bias, a norm weight, a plain ``nn.Parameter``)
becomes prunable only when named in ``extra_prunable``: pruning those is rarely intended
(``include=["blocks.*"]`` must not prune every LayerNorm and bias inside the blocks).
"""
from __future__ import annotations

import sys
from fnmatch import fnmatch

import torch.nn as nn

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_EXCLUDE = ("lm_head.*", "*.lm_head.*")


def transposed_linear_types() -> tuple[type, ...]:
    """Linear layers that store their weight as [in_features, out_features] (GPT-2's
    ``Conv1D``). Looked up only once transformers is loaded: a model holding such a layer
    has imported it, and other users do not pay for importing transformers."""
    hf_utils = sys.modules.get("transformers.pytorch_utils")
    return (hf_utils.Conv1D,) if hf_utils is not None else ()


def stores_transposed(module: nn.Module) -> bool:
    """True when ``module.weight`` is [in, out]: an output feature is a column, not a row."""
    return isinstance(module, transposed_linear_types())


def find_prunable(model: nn.Module, include: list[str] | None = None,
                  exclude: list[str] | None = None,
                  extra_prunable: list[str] | None = None) -> dict[str, nn.Module]:
    """Map each prunable parameter name to the module that owns it, in model order:
    the default candidates plus ``extra_prunable`` matches, kept where ``include`` matches
    (when given), minus ``exclude`` matches."""
    owners = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{pname}" if module_name else pname] = module
    names = [n for n, _ in model.named_parameters()]  # de-duplicates tied parameters
    heads = _output_heads(model)
    types = PRUNABLE_TYPES + transposed_linear_types()
    default = {n for n in names if n.endswith("weight") and isinstance(owners[n], types)
               and id(owners[n]) not in heads and not _matches(n, DEFAULT_EXCLUDE)}
    chosen = [n for n in names if n in default or _matches(n, extra_prunable or ())]
    if include:
        chosen = [n for n in chosen if _matches(n, include)]
    chosen = [n for n in chosen if not _matches(n, exclude or ())]
    if not chosen:
        raise ValueError(
            "the model has no prunable parameters: by default only the weights of nn.Linear, "
            "nn.Conv1d/2d/3d and transformers' Conv1D layers are pruned (embeddings and the "
            f"output head are excluded; include={include}, exclude={exclude}, "
            f"extra_prunable={extra_prunable}); include/exclude only narrow that choice: name "
            "other parameters in extra_prunable=['pattern*'] to prune them")
    return {n: owners[n] for n in chosen}


def _matches(name: str, patterns) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def _output_heads(model: nn.Module) -> set[int]:
    """ids of modules that act as the LM output head (tied to an embedding or declared)."""
    heads = set()
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in embedding_weights:
            heads.add(id(m))
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads.add(id(out))
    return heads
