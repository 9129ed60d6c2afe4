"""The library's iterative pruning: ``iterative_prune`` runs ``rounds.run_rounds`` over every
probe parameter as one stage, optionally fine-tuning in between (see rounds.py for the
schedule and the per-round decision).

Checkpoint directory (main rank writes; a rerun resumes after the last completed round)::

    schedule.json                  settings + one row per completed round (written last)
    round-001/                     mask checkpoint of all masks after round 1 (+ gradient ratios)
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

from gradprobe_dist.checkpoint.files import atomic_write
from gradprobe_dist.checkpoint.format import (RATIO_KEY, CheckpointMismatchError, model_fingerprint,
                                              tensor_sha256)
from gradprobe_dist.checkpoint.relay import RankZeroCheckpoint, lock_directory, on_main
from gradprobe_dist.pipeline.rounds import (Round, decided_ratios, layer_counts, plan_rounds, round_dir,
                                            round_masks, round_stats, run_rounds, without_nan)
from gradprobe_dist.probe.batches import LossOfBatch, make_loss_of_batch, take_batches
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.probe.gradprobe import GradProbe
from gradprobe_dist.probe.guard import guarded, scored_batches
from gradprobe_dist.probe.validation import check_mode, check_prune_args
from gradprobe_dist.probe.veto import check_fraction
from gradprobe_dist.runtime.log import get_logger

log = get_logger(__name__)

SCHEDULE_FILE = "schedule.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def iterative_prune(probe: GradProbe, dataloader: Iterable, loss_fn: Callable | None = None, *,
                    target: float, rounds: int, schedule: str = "cubic", num_batches: int = 10,
                    reduction_factor: float = 0.1, gradient_threshold: float = 0.0,
                    mode: str = "target", oversample: float = 1.5, target_scope: str = "layer",
                    finetune: Callable[[nn.Module, int], None] | None = None,
                    checkpoint_dir: str | Path | None = None, guard: bool = False,
                    guard_batches: Iterable | None = None, veto_fraction: float | None = None,
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

    Target mode with a scored strategy (magnitude, Wanda) prunes each round's quota in the
    strategy's order with the probe's vetoed candidates last: ``veto_fraction`` of each
    layer's candidates with the highest gradient ratios, or (None) those whose ratio exceeds
    ``1 + gradient_threshold`` (``GradProbe.prune``'s rule; see rounds.py).

    ``guard=True`` (no ``finetune``): the strategy's own masks at ``target``
    (``prune_by_strategy``) are tried after the rounds, and the rounds' masks are kept only
    when their calibration loss is clearly lower (``probe.guard``; ``probe.guard_report`` says
    which; a copy of the prunable weights is held meanwhile). Pass ``guard_batches``,
    calibration batches the rounds do not see: every round re-probes the same batches, so the
    rounds' masks fit them (on SmolLM2 at 50% their loss there beat Wanda's by 0.06-0.16 nats
    while held-out perplexity was worse); without, the guard scores the rounds' own batches.
    The rounds' rows are returned either way.
    """
    plan = plan_rounds(target, rounds, schedule, oversample if mode == "target" else 1.0)
    check_prune_args(target, num_batches, reduction_factor, gradient_threshold)
    check_mode(mode, oversample, target_scope)
    check_fraction(veto_fraction)
    if getattr(probe.strategy, "nm", None):
        raise ValueError(f"strategy {probe.strategy.get_name()} prunes a fixed N:M pattern, which "
                         "a schedule cannot ramp up: use probe.prune() with it, or a strategy "
                         "without pattern")
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable finetune(model, round) or None, got "
                        f"{type(finetune).__name__}")
    if guard and mode != "target":
        raise ValueError(f"guard compares masks at the same sparsity, which only target mode's rounds "
                         f"reach exactly (got mode={mode!r}): use mode='target' or drop guard")
    if guard and finetune is not None:
        raise ValueError("guard compares the rounds' masks with the strategy's own on the same "
                         "weights, but finetune changes them between rounds: drop one of the two")
    if finetune is not None and checkpoint_dir is not None and not probe.backend.replicated:
        raise ValueError(f"checkpointing fine-tuned weights under the sharded backend "
                         f"{probe.backend.name!r} is the training framework's job: pass "
                         "checkpoint_dir without finetune, or run one process / DDP")
    settings = {"target": target, "rounds": rounds, "schedule": schedule, "num_batches": num_batches,
                "reduction_factor": reduction_factor, "mode": mode,
                "gradient_threshold": gradient_threshold,
                "veto_fraction": veto_fraction if mode == "target" else None,
                "oversample": oversample if mode == "target" else None,
                "target_scope": target_scope if mode == "target" else None,
                "strategy": probe.strategy.get_name(), "statistic": probe.statistic,
                "parameters": probe.param_names, "finetune": finetune is not None}
    batches = take_batches(dataloader, num_batches)
    scored = scored_batches(guard, guard_batches, batches)
    lock = lock_directory(probe.backend, checkpoint_dir) if checkpoint_dir is not None else None
    try:  # one run per checkpoint directory
        steps = LibraryRounds(probe, batches, settings, checkpoint_dir, loss_fn=loss_fn, finetune=finetune,
                              compute_loss=compute_loss, verbose=verbose,
                              gradient_threshold=gradient_threshold, target_scope=target_scope)

        def rounds_or_alone(rounds: bool) -> dict[str, torch.Tensor]:
            if rounds:
                run_rounds(plan, steps, restart=False)
            else:  # the rounds' hooks would zero their masks in the strategy's forwards
                probe.remove_mask_hooks()
                probe.prune_by_strategy(batches, loss_fn, target, num_batches, compute_loss=compute_loss)
            return dict(probe.masks)

        if guard:
            probe.engine.ensure_prepared()
            probe.masks, probe.guard_report = guarded(
                probe.engine, probe.param_names, scored, make_loss_of_batch(loss_fn, compute_loss),
                rounds_or_alone, None, probe_label="probe rounds")
            probe.apply_mask_permanently()
            if probe.backend.is_main:
                log.info("guard (rank 0): calibration loss %.5f after the rounds, %.5f with the strategy "
                         "alone (standard error of the difference %.5f): keeping the %s masks",
                         probe.guard_report["veto_loss"], probe.guard_report["strategy_loss"],
                         probe.guard_report["difference_se"], probe.guard_report["kept"])
        else:
            rounds_or_alone(True)
    finally:
        if lock is not None:
            lock.release()
    return [steps.rows[r.number] for r in plan]


class LibraryRounds:
    """``iterative_prune``'s steps for ``run_rounds``: every probe parameter in one stage,
    fine-tuning after each round, and (with a checkpoint directory) ``schedule.json`` naming
    the completed rounds, their settings checked on resume. A round not named there is a
    leftover of a killed attempt and starts over."""

    def __init__(self, probe: GradProbe, batches: list, settings: dict, directory: str | Path | None, *,
                 loss_fn, finetune, compute_loss, verbose: bool, gradient_threshold: float,
                 target_scope: str):
        self.probe, self.backend, self.batches = probe, probe.backend, batches
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk
        self.directory = None if directory is None else Path(directory)
        self.loss_fn, self.finetune, self.compute_loss, self.verbose = loss_fn, finetune, compute_loss, verbose
        self.gradient_threshold, self.target_scope = gradient_threshold, target_scope
        hashes = {n: tensor_sha256(p) for n, p in probe.model.named_parameters()
                  if n in probe.param_names} if directory is not None and self.backend.is_main else {}
        self.fingerprint = model_fingerprint(probe.model, hashes)
        done = [] if directory is None else on_main(self.backend, self._read_or_start, share=True)
        self.rows: dict[int, dict] = {row["round"]: row for row in done}
        if done and self.backend.is_main:
            log.info("resuming %s after round %d of %d", directory, done[-1]["round"], settings["rounds"])

    # -- RoundSteps ------------------------------------------------------------------------------
    def open_round(self, round_: Round, restart: bool) -> RankZeroCheckpoint | None:
        """A completed round's checkpoint; None for a round to run (``run`` writes it)."""
        if self.directory is None or round_.number not in self.rows:
            return None
        return self._open(round_, restart)

    def _open(self, round_: Round, restart: bool) -> RankZeroCheckpoint:
        return RankZeroCheckpoint.open(
            self.backend, round_dir(self.directory, round_.number), fingerprint=lambda: self.fingerprint,
            config={**self.settings, "round": round_.number}, planned=self.probe.param_names,
            restart=restart)

    def is_done(self, round_: Round, store: RankZeroCheckpoint | None) -> bool:
        return store is not None

    def load(self, store: RankZeroCheckpoint) -> None:
        """Fine-tuned weights first (they hold the zeros too), then the masks and their hooks."""
        probe, backend = self.probe, self.backend
        if self.settings["finetune"]:
            weights = store.on_main(lambda ckpt: (ckpt.directory / WEIGHTS_FILE).read_bytes(), share=True)
            probe.model.load_state_dict(safetensors_load(weights))
        backend.prepare(probe.model, probe.param_names)  # scatter_full must know the shards
        try:
            probe.masks = {name: store.local_mask(name) for name in probe.param_names}
        finally:
            backend.release()
        probe.apply_mask_permanently()

    def run(self, round_: Round, store: RankZeroCheckpoint | None) -> None:
        probe, start = self.probe, time.perf_counter()
        record = probe.probe(self.batches, self.loss_fn, round_.sparsity, self.settings["num_batches"],
                             self.settings["reduction_factor"], self.verbose,
                             compute_loss=self.compute_loss, oversample=round_.oversample)
        before = (dict(probe.masks) if round_.number > 1 else
                  {n: torch.zeros_like(layer.tentative) for n, layer in record.layers.items()})
        mode = self.settings["mode"]
        order, vetoes = probe.target_order(record, gradient_threshold=self.gradient_threshold,
                                           veto_fraction=self.settings["veto_fraction"]) \
            if mode == "target" else (None, None)
        masks = round_masks(self.backend, record, before, round_.sparsity, mode, self.gradient_threshold,
                            self.target_scope, order, vetoes)
        probe.apply_masks(record, masks)
        probe.masks = masks
        probe.apply_mask_permanently()
        if self.finetune is not None:
            self.finetune(probe.model, round_.number)
            probe.apply_mask_permanently()
        counts = layer_counts(self.backend, record, before, masks)
        row = _row(round_.number, round_.sparsity, counts, time.perf_counter() - start)
        if self.directory is not None:  # a leftover of a killed attempt is discarded
            self._save(round_, self._open(round_, restart=True), record, before, masks, counts, row)
        if self.backend.is_main:
            log.info("round %d/%d: sparsity %.2f%% (schedule %.2f%%), %d newly pruned of %d alive "
                     "candidates, %.1f s", round_.number, round_.count, 100 * row["sparsity"],
                     100 * round_.sparsity, row["newly_pruned"], row["candidates"], row["seconds"])
        self.rows[round_.number] = row

    # -- files -----------------------------------------------------------------------------------
    def _save(self, round_: Round, store: RankZeroCheckpoint, record: ProbeRecord, before: dict,
              masks: dict, counts: dict, row: dict) -> None:
        """Masks (with the alive candidates' gradient ratios), weights, then the schedule row."""
        ratios = decided_ratios(record, before)
        for name, mask in masks.items():
            store.save_layer(name, mask, round_stats(counts[name], row["seconds"] / len(masks), round_.number),
                             {RATIO_KEY: ratios[name]()}, keep={RATIO_KEY: without_nan})
        if self.settings["finetune"]:
            store.on_main(lambda ckpt: atomic_write(ckpt.directory / WEIGHTS_FILE, _weights_bytes(self.probe.model)))
        on_main(self.backend, lambda: self._finish(round_.number, row))

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

    def _finish(self, number: int, row: dict) -> None:
        rows = json.loads((self.directory / SCHEDULE_FILE).read_text())["completed"]
        self._write_schedule([r for r in rows if r["round"] < number] + [row])
        for older in range(1, number):  # resuming needs only the latest weights
            (round_dir(self.directory, older) / WEIGHTS_FILE).unlink(missing_ok=True)


def _row(number: int, sparsity: float, counts: dict[str, dict[str, int]], seconds: float) -> dict:
    total = sum(c["numel"] for c in counts.values())
    pruned = sum(c["carried"] + c["newly_pruned"] for c in counts.values())
    return {"round": number, "schedule": sparsity, "sparsity": pruned / total if total else 0.0,
            "pruned": pruned, "newly_pruned": sum(c["newly_pruned"] for c in counts.values()),
            "candidates": sum(c["candidates"] for c in counts.values()), "seconds": round(seconds, 4)}


def _weights_bytes(model: nn.Module) -> bytes:
    """The state dict as safetensors; clones break tied storage, which safetensors refuses."""
    state = model.state_dict()
    return safetensors_save({k: v.detach().cpu().clone().contiguous() for k, v in state.items()})
