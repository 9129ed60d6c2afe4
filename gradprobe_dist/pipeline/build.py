"""Build the model a config names, in its dtype, and save/load its weights.

Under a backend that shards at load time (FSDP2, ZeRO-3) a model with a safetensors
checkpoint is built with its parameters on the meta device and each rank reads only its
own part of the weights (``parallel/loading.py``), so no rank ever holds the whole model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gradprobe_dist.pipeline.config import ModelConfig
from gradprobe_dist.models import SimpleMLP, TinyGPT, TinyGPTConfig
from gradprobe_dist.models.causal_lm_loss import use_causal_lm_loss
from gradprobe_dist.models.checkpointing import checkpoint_activations
from gradprobe_dist.parallel.loading import WeightReader, parameters_on_meta
from gradprobe_dist.probe.params import find_prunable

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(cfg: ModelConfig, backend=None) -> nn.Module:
    """A model with the configured weights loaded, in ``cfg.dtype``: on the CPU (the backend
    places it), or already sharded by ``backend`` when it loads shards itself."""
    if cfg.kind == "hf":
        _check_hf_dir(cfg.path)
    reader = checkpoint_reader(cfg)
    if reader is not None and callable(getattr(backend, "load_sharded", None)):
        model = _hf_options(build_skeleton(cfg, reader), cfg)
        names = list(find_prunable(model, cfg.include, cfg.exclude, cfg.extra_prunable))
        backend.load_sharded(model, names, reader)
        return model
    dtype = resolve_dtype(cfg, reader)
    if cfg.kind == "hf":
        from transformers import AutoModelForCausalLM

        return _hf_options(AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **cfg.options), cfg)
    model = _built_in(cfg)
    if cfg.path:
        load_weights(model, cfg.path)
    return model.to(dtype)


def _hf_options(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``model.gradient_checkpointing`` and ``model.blockwise_loss`` (each a no-op unless set;
    the loss only where transformers' own causal-LM loss would run)."""
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    if cfg.blockwise_loss:
        use_causal_lm_loss(model)
    return model


def build_skeleton(cfg: ModelConfig, reader: WeightReader | None = None) -> nn.Module:
    """The model of ``cfg`` in its dtype with every parameter on the meta device (buffers
    real); no weight is read or allocated."""
    dtype = resolve_dtype(cfg, reader)
    with parameters_on_meta():
        if cfg.kind == "hf":
            from transformers import AutoConfig, AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), dtype=dtype,
                                                    **cfg.options)
        return _built_in(cfg).to(dtype)


def checkpoint_reader(cfg: ModelConfig) -> WeightReader | None:
    """The safetensors weights ``cfg`` loads, if any (a torch ``.pt`` state dict: None)."""
    if not cfg.path or (cfg.kind != "hf" and Path(cfg.path).suffix != ".safetensors"):
        return None
    if cfg.kind != "hf" and not Path(cfg.path).is_file():
        raise FileNotFoundError(f"weights file {cfg.path} does not exist: train or export the model "
                                "first, or clear model.path")
    try:
        return WeightReader(cfg.path)
    except FileNotFoundError:
        if cfg.kind == "hf":  # e.g. only pytorch_model.bin: transformers loads it whole
            return None
        raise


def resolve_dtype(cfg: ModelConfig, reader: WeightReader | None) -> torch.dtype:
    """``model.dtype``; ``auto`` is the checkpoint's own (float32 without safetensors weights)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    return reader.dtype() if reader is not None else torch.float32


def _check_hf_dir(path: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("model.kind 'hf' needs transformers: pip install 'gradprobe-dist[hf]'") from None
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path} is not a directory holding a saved "
                                "Hugging Face model (config.json + weights)")


def _built_in(cfg: ModelConfig) -> nn.Module:
    return TinyGPT(TinyGPTConfig.from_dict(cfg.options)) if cfg.kind == "tinygpt" else SimpleMLP(**cfg.options)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file or a torch state dict, strictly (names and shapes must match)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: train or export the model "
                                "first, or clear model.path")
    try:  # a damaged or foreign file: safetensors, zip and unpickling errors all differ
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt"):
                pass
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"weights file {path} cannot be read ({type(err).__name__}: {err}); point "
                         "model.path at a .safetensors file or a torch state dict (.pt)") from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_model

            missing, unexpected = load_model(model, path, strict=False)
        else:
            if not isinstance(state, dict):
                raise ValueError(f"weights file {path} holds a {type(state).__name__}, not a state dict; "
                                 "save model.state_dict()")
            result = model.load_state_dict(state, strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights file {path} does not fit the configured model ({err}); "
                         "check model.options") from None
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not match the configured model: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; check model.options")


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Save as safetensors (tied weights stored once)."""
    from safetensors.torch import save_model

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
