"""Build the model a config names, and save/load its weights."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gradprobe_dist.pipeline.config import ModelConfig
from gradprobe_dist.models import SimpleMLP, TinyGPT, TinyGPTConfig
from gradprobe_dist.models.checkpointing import checkpoint_activations


def build_model(cfg: ModelConfig) -> nn.Module:
    """A fresh model on the CPU (the backend places it), with the configured weights loaded."""
    if cfg.kind == "hf":
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise ImportError("model.kind 'hf' needs transformers: pip install 'gradprobe-dist[hf]'") from None
        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"model.path {cfg.path} is not a directory holding a saved "
                                    "Hugging Face model (config.json + weights)")
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, **cfg.options)
        if cfg.gradient_checkpointing:
            checkpoint_activations(model)
        return model
    model = TinyGPT(TinyGPTConfig.from_dict(cfg.options)) if cfg.kind == "tinygpt" else SimpleMLP(**cfg.options)
    if cfg.path:
        load_weights(model, cfg.path)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file or a torch state dict, strictly (names and shapes must match)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: train or export the model "
                                "first, or clear model.path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_model

            missing, unexpected = load_model(model, path, strict=False)
        else:
            result = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
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
