"""Activation checkpointing for Hugging Face models, in eval mode too.

Each checkpointed decoder layer keeps only its input during the forward and recomputes
its activations in the backward: memory per layer falls from the activations of a whole
block to one hidden state, for one more forward of each layer. The probe runs the model
in eval mode (dropout off, so both passes see one function), but transformers' layers
only checkpoint while ``training`` is set; so each layer is marked training for its own
call alone, and its submodules (dropout included) stay in eval mode.
"""
from __future__ import annotations

import torch.nn as nn


def checkpoint_activations(model: nn.Module) -> int:
    """Turn on non-reentrant activation checkpointing of every layer that supports it;
    returns how many layers will checkpoint."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} does not support "
                         "activation checkpointing; set model.gradient_checkpointing=false")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # non-reentrant checkpoints need no input that requires grad; one would make the
    # backward run through every frozen block before the probed ones
    model.disable_input_require_grads()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.register_forward_pre_hook(_training_for_this_call)
        layer.register_forward_hook(_back_to_its_mode)
    return len(layers)


def _training_for_this_call(module: nn.Module, args) -> None:
    module._mode_outside_call = module.training
    module.training = True


def _back_to_its_mode(module: nn.Module, args, output) -> None:
    module.training = module._mode_outside_call
