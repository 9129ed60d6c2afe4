"""Write a pruned model that a user can load and serve, without ever losing a file.

A Hugging Face export is a complete model directory: config, weights in the model's dtype,
generation config (``save_pretrained``), every other file of the source directory that is
not a weight file (tokenizer, chat template, ...), and the masks as a sidecar
(``MASKS_FILE``, boolean safetensors, True = pruned). It is written beside the target and
renamed into place, so a failed export leaves the target as it was, and a replaced
directory keeps no stale file (e.g. an old ``model.safetensors.index.json``). The target
must not be, hold or lie inside the source model or the mask checkpoint, and a non-empty
target is replaced only when asked (``overwrite``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

MASKS_FILE = "pruning_masks.safetensors"
#: files of a source directory that the export writes itself or must not carry over
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_OWN_FILES = ("gradprobe_fetched.json",)


def check_target(out: str | Path, protected: dict[str, str | None], overwrite: bool) -> None:
    """Refuse an export target that would overwrite what it reads (``protected``: config key
    or option -> path) or, without ``overwrite``, a non-empty directory or existing file."""
    target = Path(out).resolve()
    for what, path in protected.items():
        if not path:
            continue
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"--out {out} would overwrite {what} ({path}), which the export reads: "
                             "choose another --out")
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        if not overwrite:
            raise ValueError(f"--out {out} already exists and is not empty: choose a new path, or "
                             "pass --overwrite to replace it")


def write_hf(model: nn.Module, source: str | Path, masks: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Save the Hugging Face directory described above; returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        for file in sorted(Path(source).iterdir()):
            if file.is_file() and not (partial / file.name).exists() and not _skipped(file.name):
                shutil.copy2(file, partial / file.name)
        save_file({name: mask.contiguous() for name, mask in masks.items()}, partial / MASKS_FILE)
        replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def write_file(save, out: str | Path) -> Path:
    """``save(path)`` into a file beside ``out``, then renamed onto it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        save(partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def replace(partial: Path, out: Path) -> None:
    """Put the finished directory ``partial`` where ``out`` is (``out`` gone only once
    ``partial`` is complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        if out.exists():
            out.unlink()
        partial.rename(out)


def _skipped(name: str) -> bool:
    return name in _OWN_FILES or name.endswith(_NOT_COPIED)
