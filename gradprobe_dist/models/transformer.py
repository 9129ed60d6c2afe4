"""TinyGPT: a small nanoGPT-like decoder-only language model.

Plain PyTorch on purpose: each ``Block`` is its own module so a parallel backend can wrap
it (FSDP2 ``fully_shard`` per block) without the model knowing. ``forward`` follows the
Hugging Face causal-LM convention: ``labels`` are the input ids and are shifted inside.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.export
import torch.nn as nn
import torch.nn.functional as F

from gradprobe_dist.probe.validation import is_int, is_number

IGNORE_INDEX = -100
INIT_STD = 0.02


@dataclass
class TinyGPTConfig:
    """Sizes of a TinyGPT; validated on construction so a bad YAML fails before any compute."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_int(value):
                raise TypeError(f"TinyGPTConfig.{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"TinyGPTConfig.{name} must be positive, got {value}; set it to 1 or more")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TinyGPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not is_number(self.dropout):
            raise TypeError(f"TinyGPTConfig.dropout must be a float, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TinyGPTConfig.dropout must be in [0, 1), got {self.dropout}; use 0.0 to disable it")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"TinyGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"change one of them, e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TinyGPTConfig:
        """Build from a parsed YAML/JSON mapping; an unknown key is a TypeError listing the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown TinyGPTConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)


@dataclass
class CausalLMOutput:
    """What ``TinyGPT.forward`` returns: ``loss`` is None when no labels were given."""

    loss: torch.Tensor | None
    logits: torch.Tensor


# A pytree node, like Hugging Face's ModelOutput, so torch utilities that walk outputs with
# pytree (DDP's find_unused_parameters sink, torch.compile, export) see the tensors inside.
torch.export.register_dataclass(CausalLMOutput)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token t only attends to tokens <= t."""

    def __init__(self, config: TinyGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, embd = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, embd // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(batch, seq, embd)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: ``fc`` (4x wider) -> GELU -> ``proj``."""

    def __init__(self, config: TinyGPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: TinyGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``blocks``, final LayerNorm ``ln_f`` and ``lm_head``.

    With ``tie_weights`` the ``lm_head`` shares its weight with ``tok_emb`` (one Parameter,
    so it appears once in ``named_parameters()``, as ``tok_emb.weight``).
    """

    def __init__(self, config: TinyGPTConfig | None = None):
        super().__init__()
        self.config = config if config is not None else TinyGPTConfig()
        cfg = self.config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """nanoGPT's init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        """Number of distinct parameter elements (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits ``(B, T, vocab)``; with ``labels`` (usually the input ids) also the mean next-token loss.

        Position t is scored against ``labels[:, t + 1]``; label ``-100`` is ignored.
        """
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"TinyGPT input_ids must be an integer tensor of shape (batch, seq), got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}; pass token ids, e.g. input_ids.long().view(B, -1)"
            )
        seq = input_ids.shape[1]
        if seq > self.config.block_size:
            raise ValueError(
                f"TinyGPT got a sequence of {seq} tokens but block_size is {self.config.block_size}; "
                f"truncate the input or build the model with block_size>={seq}"
            )
        positions = torch.arange(seq, device=input_ids.device)
        x = self.emb_dropout(self.tok_emb(input_ids) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(loss=loss, logits=logits)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``, skipping ``-100`` labels."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must match input_ids shape {tuple(logits.shape[:2])}; "
            f"pass labels=input_ids (the model shifts them itself)"
        )
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)
