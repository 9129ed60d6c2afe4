"""Iterative pruning: reach the target sparsity over several probe rounds, optionally
fine-tuning in between (gradual pruning, Zhu & Gupta 2017, arXiv:1710.01878).

Round r = 1..k brings the pruned fraction to the schedule value s_r *of all* prunable
weights: cubic ``s_r = s_f + (0 - s_f)(1 - r/k)^3`` prunes fast while many redundant weights
remain and slowly near the end; linear ``s_r = s_f r/k``. Weights pruned in earlier rounds
stay pruned. They are zero, so magnitude and Wanda select them first again: harmless,
since scaling zero changes nothing and a round decides only among its *alive* candidates.

* ``mode="target"``: the strategy selects ``s_(r-1) + oversample (s_r - s_(r-1))`` of the
  weights (the zeros plus the smallest alive ones: the round's increment, oversampled) and
  the alive candidates with the lowest gradient ratio new/old are pruned until exactly
  ``floor(s_r numel)`` weights are pruned per layer (or over all layers with
  ``target_scope="global"``). A strategy that does not re-select the zeros (random) offers
  fewer alive candidates; a shortfall is logged and shows in the rows.
* ``mode="threshold"``: the probe selects s_r; alive candidates whose gradient did not grow
  by more than ``gradient_threshold`` are pruned, so a round ends at or below s_r.

Checkpoint directory (main rank writes; a rerun resumes after the last completed round)::

    schedule.json                  settings + one row per completed round (written last)
    round-001/                     MaskCheckpoint of all masks after round 1 (+ gradient ratios)
    round-00k/model.safetensors    fine-tuned weights of the latest completed round only
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.batches import LossOfBatch, take_batches
from gradprobe_dist.checkpoint.store import (CheckpointMismatchError, MaskCheckpoint, atomic_write,
                         model_fingerprint)
from gradprobe_dist.probe.record import ProbeRecord, prune_decision
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.pipeline.plots import CARRIED_KEY, RATIO_KEY, ratio_tensors
from gradprobe_dist.probe.gradprobe import GradProbe
from gradprobe_dist.strategies.base import count_to_select
from gradprobe_dist.probe.validation import check_mode, check_prune_args, is_int, is_number

log = get_logger(__name__)

SCHEDULES = ("cubic", "linear")
SCHEDULE_FILE = "schedule.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_FLOAT_MAX = torch.finfo(torch.float32).max


def schedule_values(target: float, rounds: int, kind: str = "cubic") -> list[float]:
    """Sparsity after each round 1..``rounds``, from 0 up to exactly ``target``."""
    if not is_number(target):
        raise TypeError(f"target must be a number, got {type(target).__name__}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target={target} is outside (0, 1): pass the sparsity the last round "
                         "reaches, e.g. 0.8 for 80%")
    if not is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1 (1 = one-shot pruning)")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is unknown: use 'cubic' (Zhu & Gupta) or 'linear'")
    if kind == "linear":
        return [target * r / rounds for r in range(1, rounds + 1)]
    return [target + (0.0 - target) * (1 - r / rounds) ** 3 for r in range(1, rounds + 1)]


def iterative_prune(probe: GradProbe, dataloader: Iterable, loss_fn: Callable | None = None, *,
                    target: float, rounds: int, schedule: str = "cubic", num_batches: int = 10,
                    reduction_factor: float = 0.1, gradient_threshold: float = 0.0,
                    mode: str = "target", oversample: float = 1.5, target_scope: str = "layer",
                    finetune: Callable[[nn.Module, int], None] | None = None,
                    checkpoint_dir: str | Path | None = None,
                    compute_loss: LossOfBatch | None = None, verbose: bool = False) -> list[dict]:
    """Prune ``probe.model`` to ``target`` in ``rounds`` probe rounds; returns one row per
    round: ``round``, ``schedule`` (s_r), ``sparsity`` (pruned / prunable weights),
    ``pruned``, ``newly_pruned``, ``candidates`` (alive tentative weights), ``seconds``.

    The same ``num_batches`` calibration batches (taken once) serve every round.
    ``finetune(model, round)`` runs after each round's pruning (round = 1..rounds) with the
    pruned weights held at zero (``GradProbe.apply_mask_permanently`` hooks; the masks are
    re-applied after it returns whatever it did). Seed it from ``round`` for a resumed run to
    end identical to an uninterrupted one. The model ends pruned with those hooks installed
    (``probe.remove_mask_hooks()`` takes them off) and ``probe.masks`` holding every mask.
    """
    values = schedule_values(target, rounds, schedule)
    check_prune_args(target, num_batches, reduction_factor, gradient_threshold)
    check_mode(mode, oversample, target_scope)
    if getattr(probe.strategy, "nm", None):
        raise ValueError(f"strategy {probe.strategy.get_name()} prunes a fixed N:M pattern, which "
                         "a schedule cannot ramp up: use probe.prune() with it, or a strategy "
                         "without pattern")
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable finetune(model, round) or None, got "
                        f"{type(finetune).__name__}")
    if finetune is not None and checkpoint_dir is not None and not probe.backend.replicated:
        raise ValueError(f"checkpointing fine-tuned weights under the sharded backend "
                         f"{probe.backend.name!r} is the training framework's job: pass "
                         "checkpoint_dir without finetune, or run one process / DDP")
    settings = {"target": target, "rounds": rounds, "schedule": schedule, "num_batches": num_batches,
                "reduction_factor": reduction_factor, "mode": mode,
                "gradient_threshold": gradient_threshold if mode == "threshold" else None,
                "oversample": oversample if mode == "target" else None,
                "target_scope": target_scope if mode == "target" else None,
                "strategy": probe.strategy.get_name(), "statistic": probe.statistic,
                "parameters": probe.param_names, "finetune": finetune is not None}
    batches = take_batches(dataloader, num_batches)
    store = RoundCheckpoint(checkpoint_dir, probe, settings) if checkpoint_dir is not None else None
    rows = store.resume() if store is not None else []
    pruned = dict(probe.masks) if rows else None
    for number in range(len(rows) + 1, rounds + 1):
        start = time.perf_counter()
        sparsity = values[number - 1]
        selection = tentative_fraction(values, number, oversample if mode == "target" else 1.0)
        record = probe.probe(batches, loss_fn, sparsity, num_batches, reduction_factor, verbose,
                             compute_loss=compute_loss, oversample=max(1.0, selection / sparsity))
        if pruned is None:
            pruned = {n: torch.zeros_like(layer.tentative) for n, layer in record.layers.items()}
        masks = round_masks(probe.backend, record, pruned, sparsity, mode, gradient_threshold,
                            target_scope)
        probe.apply_masks(record, masks)
        probe.masks = masks
        probe.apply_mask_permanently()
        if finetune is not None:
            finetune(probe.model, number)
            probe.apply_mask_permanently()
        counts = layer_counts(probe.backend, record, pruned, masks)
        row = _row(number, sparsity, counts, time.perf_counter() - start)
        if store is not None:
            store.save_round(number, record, pruned, masks, counts, row)
        if probe.backend.is_main:
            log.info("round %d/%d: sparsity %.2f%% (schedule %.2f%%), %d newly pruned of %d alive "
                     "candidates, %.1f s", number, rounds, 100 * row["sparsity"], 100 * sparsity,
                     row["newly_pruned"], row["candidates"], row["seconds"])
        rows.append(row)
        pruned = masks
    return rows


def tentative_fraction(values: list[float], number: int, oversample: float) -> float:
    """What the strategy selects in round ``number``: last round's zeros plus ``oversample``
    times this round's increment, ``s_(r-1) + oversample (s_r - s_(r-1))`` (capped at 1).
    Oversampling all of s_r instead would soon scale every weight at once, and a network
    scaled everywhere tells little about any one weight."""
    previous = values[number - 2] if number > 1 else 0.0
    return min(1.0, previous + oversample * (values[number - 1] - previous))


def round_masks(backend: Backend, record: ProbeRecord, pruned: dict[str, torch.Tensor],
                sparsity: float, mode: str, gradient_threshold: float,
                scope: str = "layer") -> dict[str, torch.Tensor]:
    """The masks after one round: ``pruned`` (earlier rounds) plus the alive tentative weights
    chosen by the round's rule (see the module docstring). All tensors are local parts."""
    names = list(record.layers)
    alive = {n: ~pruned[n][layer.tentative] for n, layer in record.layers.items()}
    if mode == "threshold":
        chosen = [alive[n] & prune_decision(layer.old, layer.new, gradient_threshold)
                  .to(alive[n].device) for n, layer in record.layers.items()]
    else:
        counts = backend.sum_over_shards(torch.tensor(
            [[int(pruned[n].sum()), int(alive[n].sum())] for n in names], dtype=torch.float64))
        carried, candidates = counts[:, 0].long().tolist(), counts[:, 1].long().tolist()
        numels = [backend.local_slice(n).full_numel for n in names]
        # already-pruned weights rank after every alive candidate, even one whose ratio is inf
        scores = []
        for n, layer in record.layers.items():
            ratio = layer.ratio().clamp(max=_FLOAT_MAX)
            excluded = torch.full_like(ratio, float("inf"))
            scores.append(torch.where(alive[n].to(ratio.device), ratio, excluded))
        if scope == "global":
            wanted = [count_to_select(sum(numels), sparsity) - sum(carried)]
            available = [sum(candidates)]
        else:
            wanted = [count_to_select(numel, sparsity) - c for numel, c in zip(numels, carried)]
            available = candidates
        ks = [min(max(w, 0), a) for w, a in zip(wanted, available)]
        if backend.is_main and ks != [max(w, 0) for w in wanted]:
            log.warning("the strategy offered too few alive candidates to reach sparsity %.4g: "
                        "raise oversample, or use a strategy that selects the pruned zeros "
                        "first (magnitude, wanda)", sparsity)
        chosen = (backend.select_smallest(scores, ks[0]) if scope == "global"
                  else backend.select_smallest_each(scores, ks))
    return {n: pruned[n] | layer.expand(c) for (n, layer), c in zip(record.layers.items(), chosen)}


def layer_counts(backend: Backend, record: ProbeRecord, before: dict[str, torch.Tensor],
                 after: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Per layer (over all ranks): ``numel``, ``carried`` (pruned before the round),
    ``candidates`` (alive tentative weights) and ``newly_pruned``."""
    names = list(record.layers)
    local = torch.tensor([[int(before[n].sum()), int((~before[n] & layer.tentative).sum()),
                           int((after[n] & ~before[n]).sum())]
                          for n, layer in record.layers.items()], dtype=torch.float64)
    totals = backend.sum_over_shards(local).long().tolist()
    return {n: {"numel": backend.local_slice(n).full_numel, "carried": c, "candidates": a,
                "newly_pruned": p} for n, (c, a, p) in zip(names, totals)}


def _row(number: int, sparsity: float, counts: dict[str, dict[str, int]], seconds: float) -> dict:
    total = sum(c["numel"] for c in counts.values())
    pruned = sum(c["carried"] + c["newly_pruned"] for c in counts.values())
    return {"round": number, "schedule": sparsity, "sparsity": pruned / total if total else 0.0,
            "pruned": pruned, "newly_pruned": sum(c["newly_pruned"] for c in counts.values()),
            "candidates": sum(c["candidates"] for c in counts.values()), "seconds": round(seconds, 4)}


def _from_main(backend: Backend, fn: Callable, share: bool = True):
    """``fn()`` on the main rank; its result on every rank (``share``) or on the main rank
    only. If it raised, every rank raises, so no rank waits in a collective forever."""
    error, result = None, None
    if backend.is_main:
        try:
            result = fn()
        except Exception as err:  # re-raised on every rank below
            error = err
    message = None if error is None else f"{type(error).__name__}: {error}"
    message, shared = backend.broadcast_object((message, result if share and error is None else None))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"the main rank failed: {message}")
    return shared if share else result


class RoundCheckpoint:
    """``schedule.json`` plus one MaskCheckpoint per completed round; writes on the main rank.

    A round's manifest holds every mask so far; per layer, ``tentative`` counts the alive
    candidates the round decided about, ``restored`` those it kept, ``carried`` the weights
    pruned in earlier rounds (``pruned = carried + tentative - restored``), and the saved
    ``ratio`` tensor the candidates' gradient ratios (for ``gradprobe_dist.pipeline.plots``).
    """

    def __init__(self, directory: str | Path, probe: GradProbe, settings: dict):
        self.directory = Path(directory)
        self.probe = probe
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk
        self.fingerprint = model_fingerprint(probe.model)

    def round_dir(self, number: int) -> Path:
        return self.directory / f"round-{number:03d}"

    def resume(self) -> list[dict]:
        """The rows of the completed rounds, after loading the last one's masks (and weights)
        into the model; writes a fresh ``schedule.json`` when there is none."""
        rows = _from_main(self.probe.backend, self._read_or_start)
        if rows:
            self._load_round(rows[-1]["round"])
            if self.probe.backend.is_main:
                log.info("resuming %s after round %d of %d", self.directory, rows[-1]["round"],
                         self.settings["rounds"])
        return rows

    def _read_or_start(self) -> list[dict]:
        path = self.directory / SCHEDULE_FILE
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_schedule([])
            return []
        state = json.loads(path.read_text())
        recorded = state["settings"]
        differences = [f"{key}={json.dumps(recorded.get(key, 'missing'))} there but "
                       f"{key}={json.dumps(self.settings.get(key, 'missing'))} now"
                       for key in [*self.settings, *(k for k in recorded if k not in self.settings)]
                       if recorded.get(key, "missing") != self.settings.get(key, "missing")]
        if differences:
            raise CheckpointMismatchError(
                f"'{path}' holds another iterative run: " + "; ".join(differences) + ". Rerun "
                "with the same settings to resume, or pass another checkpoint_dir (or delete "
                "this one) to start over")
        return state["completed"]

    def _write_schedule(self, rows: list[dict]) -> None:
        state = {"format_version": FORMAT_VERSION, "settings": self.settings, "completed": rows}
        atomic_write(self.directory / SCHEDULE_FILE, json.dumps(state, indent=2).encode())

    def _round_config(self, number: int) -> dict:
        return {**self.settings, "round": number}

    def _load_round(self, number: int) -> None:
        """Fine-tuned weights first (they hold the zeros too), then the masks and their hooks."""
        probe, backend = self.probe, self.probe.backend
        if self.settings["finetune"]:
            data = _from_main(backend, lambda: (self.round_dir(number) / WEIGHTS_FILE).read_bytes())
            probe.model.load_state_dict(safetensors_load(data))
        ckpt = _from_main(backend, lambda: MaskCheckpoint.open(
            self.round_dir(number), model_fingerprint=self.fingerprint,
            config=self._round_config(number)), share=False)
        backend.prepare(probe.model, probe.param_names)  # scatter_full must know the shards
        try:
            masks = {}
            for name in probe.param_names:
                full = _from_main(backend, lambda: ckpt.load_layer(name), share=False)
                masks[name] = backend.scatter_full(name, full).to(backend.local_weight(name).device)
        finally:
            backend.release()
        probe.masks = masks
        probe.apply_mask_permanently()

    def save_round(self, number: int, record: ProbeRecord, before: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor], counts: dict[str, dict[str, int]],
                   row: dict) -> None:
        """Masks (with the alive candidates' gradient ratios), weights, then the schedule row."""
        backend = self.probe.backend
        directory = self.round_dir(number)
        ckpt = _from_main(backend, lambda: MaskCheckpoint.open(
            directory, model_fingerprint=self.fingerprint, config=self._round_config(number),
            restart=True), share=False)  # a leftover of a killed attempt is discarded
        ratios = ratio_tensors(record)
        seconds = row["seconds"] / len(masks)
        for name, mask in masks.items():
            full = backend.gather_full(name, mask)
            carried = before[name].to(ratios[name].device)
            ratio = backend.gather_full(name, ratios[name].masked_fill(carried, float("nan")))
            c = counts[name]
            stats = {"tentative": c["candidates"], "restored": c["candidates"] - c["newly_pruned"],
                     "seconds": round(seconds, 4), "round": number, CARRIED_KEY: c["carried"]}
            _from_main(backend, lambda: ckpt.save_layer(
                name, full, stats=stats, tensors={RATIO_KEY: ratio[~ratio.isnan()]}), share=False)
        if self.settings["finetune"]:
            weights = directory / WEIGHTS_FILE
            _from_main(backend, lambda: atomic_write(weights, _weights_bytes(self.probe.model)),
                       share=False)
        _from_main(backend, lambda: self._finish(number, row), share=False)

    def _finish(self, number: int, row: dict) -> None:
        rows = json.loads((self.directory / SCHEDULE_FILE).read_text())["completed"]
        self._write_schedule([r for r in rows if r["round"] < number] + [row])
        for older in range(1, number):  # resuming needs only the latest weights
            (self.round_dir(older) / WEIGHTS_FILE).unlink(missing_ok=True)


def _weights_bytes(model: nn.Module) -> bytes:
    """The state dict as safetensors; clones break tied storage, which safetensors refuses."""
    state = model.state_dict()
    return safetensors_save({k: v.detach().cpu().clone().contiguous() for k, v in state.items()})
