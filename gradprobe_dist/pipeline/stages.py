"""Stages: the prunable weights split in model order, each probed on a network in which every
earlier stage's masks are already applied, each decided layer saved to the checkpoint at once.

A stage is the unit of recovery. On resume, fully checkpointed stages are applied and
skipped; a stage that was cut short is probed again whole (identical inputs give identical
masks) and only its missing layers are written.

Where no veto would read the probe's measurement, a stage is not probed: plain SparseGPT
(``prune.mode=sparsegpt``, ``veto=none``) runs one forward pass, and the strategy alone
(``mode=target``, ``veto=none``, see ``strategy_alone``) at most one, with no backward.
"""
from __future__ import annotations

import time
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn as nn

from gradprobe_dist.checkpoint.format import RATIO_KEY, STAGE_KEY, UPDATED_WEIGHT_KEY
from gradprobe_dist.checkpoint.relay import RankZeroCheckpoint
from gradprobe_dist.pipeline.inputs import mask_config
from gradprobe_dist.pipeline.rounds import (Round, decided_ratios, layer_counts, round_dir, round_masks,
                                            round_stats, without_nan)
from gradprobe_dist.probe.batches import is_lm_batch
from gradprobe_dist.probe.gradprobe import GradProbe
from gradprobe_dist.probe.prefix import block_list
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.pipeline.config import PruneConfig
from gradprobe_dist.reconstruct.pruner import SparseGPT
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.strategies.allocation import Allocation
from gradprobe_dist.strategies.base import PruningStrategy, ScoredStrategy

log = get_logger(__name__)

STAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plan_stages(model: nn.Module, names: list[str], stage_size: int,
                stages: list[list[str]] | None) -> list[list[str]]:
    """Split prunable parameter names (model order) into stages."""
    if stages:
        plan, taken = [], set()
        for i, patterns in enumerate(stages):
            chosen = [n for n in names if n not in taken and any(fnmatch(n, p) for p in patterns)]
            if not chosen:
                raise ValueError(f"prune.stages[{i}] = {patterns} matches no prunable parameter "
                                 f"(e.g. {names[0]!r}); fix the patterns")
            taken.update(chosen)
            plan.append(chosen)
        rest = [n for n in names if n not in taken]
        return plan + ([rest] if rest else [])
    if stage_size <= 0:
        return [names]
    prefix = _block_list_prefix(model, names)
    if prefix is None:
        raise ValueError("prune.stage_size needs a model with a list of blocks (an nn.ModuleList "
                         "such as transformer layers); use prune.stages with patterns instead")
    groups: dict[int, list[str]] = {}
    rest = []
    for n in names:
        if n.startswith(prefix):
            groups.setdefault(int(n[len(prefix):].split(".")[0]) // stage_size, []).append(n)
        else:
            rest.append(n)
    return [groups[k] for k in sorted(groups)] + ([rest] if rest else [])


def _block_list_prefix(model: nn.Module, names: list[str]) -> str | None:
    """Name prefix of the ModuleList holding the most prunable parameters."""
    found = block_list(model, names)
    return None if found is None else (f"{found[0]}." if found[0] else "")


def loss_fn_for(batches: list) -> nn.Module | None:
    """Dict batches carry labels and the model computes its own loss; (inputs, targets)
    batches are classification."""
    return None if is_lm_batch(batches[0]) else nn.CrossEntropyLoss()


class StageLoop:
    """Runs the stages of one round into a checkpoint (see the module docstring)."""

    def __init__(self, job, strategy, result, bar):
        self.job, self.strategy, self.result, self.bar = job, strategy, result, bar

    def run_round(self, round_: Round, store: RankZeroCheckpoint, directory: str | Path) -> None:
        """Every stage of one round not yet in ``store``; finished stages are applied."""
        job = self.job
        done = set(store.completed)
        finished = [s for s in job.stages if all(n in done for n in s)]
        job.apply_checkpoint(store, [n for s in finished for n in s])
        self.result.stages_resumed += len(finished)
        self.bar.update(len(finished))
        if finished and job.show_progress:
            log.info("%sresuming: %d of %d stages already in %s, not recomputed", round_.label,
                     len(finished), len(job.stages), directory)
        for index, stage in enumerate(job.stages):
            if stage not in finished:
                written = self.run_stage(index, stage, store, done, round_)
                prefix = f"{Path(directory).name}/" if round_.count > 1 else ""
                self.result.layers_written += [prefix + name for name in written]
                self.bar.update(1)

    def run_stage(self, index: int, stage: list[str], store: RankZeroCheckpoint, done: set[str],
                  round_: Round) -> list[str]:
        """Decide one stage (probe it, or SparseGPT or the strategy alone where no veto reads a
        probe), then gather and save each of its layers not yet checkpointed."""
        job, cfg, backend = self.job, self.job.cfg.prune, self.job.backend
        plain_sparsegpt = cfg.mode == "sparsegpt" and cfg.veto == "none"
        alone = strategy_alone(cfg, self.strategy, round_)
        if job.show_progress:
            log.info("%sstage %d/%d: %s %d layers (%s ... %s)", round_.label, index + 1, len(job.stages),
                     "pruning" if plain_sparsegpt or alone else "probing", len(stage), stage[0], stage[-1])
        stage_start = time.perf_counter()
        before = job.read_local_masks(round_.previous, stage) if round_.previous is not None else {}
        if plain_sparsegpt:
            masks, counts, ratios = self.plain_sparsegpt(stage)
        elif alone:
            masks, counts, ratios = self.strategy_stage(stage)
        else:
            masks, counts, ratios = self.probe_stage(stage, before, round_)
        # weights the method moved beyond the zeros: the checkpoint keeps them for export
        updated = ({n: backend.local_weight(n) for n in stage}
                   if cfg.mode == "sparsegpt" or cfg.reconstruct else {})
        seconds = (time.perf_counter() - stage_start) / len(stage)
        written = []
        for name in stage:
            if name in done:  # saved before an interruption: the probe must have agreed
                full = backend.gather_full(name, masks[name])
                store.on_main(lambda ckpt: _check_agrees(ckpt, name, full))
                continue
            stats = {**round_stats(counts[name], seconds, round_.number if round_.count > 1 else None),
                     STAGE_KEY: index}
            tensors = {RATIO_KEY: ratios[name]()} if name in ratios else {}
            if name in updated:
                tensors[UPDATED_WEIGHT_KEY] = updated[name]
            store.save_layer(name, masks[name], stats, tensors, keep={RATIO_KEY: without_nan})
            written.append(name)
            if job.show_progress:
                info = store.checkpoint.layer_info(name)
                log.info("%sstage %d/%d: %s %s pruned %d/%d (%.1f%%), restored %d", round_.label,
                         index + 1, len(job.stages), name, "x".join(map(str, info["shape"])),
                         info["pruned"], info["numel"], 100 * info["sparsity"], info["restored"])
        return written

    def probe_stage(self, stage: list[str], before: dict[str, torch.Tensor], round_: Round
                    ) -> tuple[dict, dict, dict]:
        """GradProbe on one stage: its local masks, per-layer counts and, per layer, a call that
        makes its gradient ratios (``decided_ratios``)."""
        job, cfg, backend = self.job, self.job.cfg.prune, self.job.backend
        probe = self.gradprobe(stage)
        record = probe.probe(job.calibration, loss_fn_for(job.calibration), round_.sparsity,
                             cfg.num_batches, cfg.reduction_factor, verbose=not self.bar.disable,
                             oversample=round_.oversample, allocation=_allocation(cfg),
                             hessians=cfg.reconstruct or cfg.mode == "sparsegpt")
        if round_.count == 1:
            options = dict(mode=cfg.mode, gradient_threshold=cfg.gradient_threshold, target_scope=cfg.target_scope,
                           # prune.veto ranks target/sparsegpt candidates; threshold mode decides by the probe
                           reconstruct=cfg.reconstruct, veto=cfg.veto != "none" or cfg.mode == "threshold",
                           veto_fraction=cfg.fraction_vetoed)
            if cfg.guard:
                masks = probe.decide_guarded(record, cfg.sparsity, job.guard_calibration,
                                             loss_fn_for(job.calibration), keep_hessians=False, **options)
            else:
                masks = probe.decide(record, cfg.sparsity, **options)
        else:
            before = before or _nothing_pruned(record)
            order, vetoes = probe.target_order(
                record, gradient_threshold=cfg.gradient_threshold, veto=cfg.veto != "none",
                veto_fraction=cfg.fraction_vetoed) \
                if cfg.mode == "target" else (None, None)
            masks = probe.apply_masks(record, round_masks(backend, record, before, round_.sparsity, cfg.mode,
                                                          cfg.gradient_threshold, cfg.target_scope, order, vetoes))
        # made only now, in one round: one byte per weight not held through the decision
        before = before or _nothing_pruned(record)
        # SparseGPT may prune weights the strategy never proposed: count only the candidates
        decided = {n: m & record.layers[n].tentative for n, m in masks.items()} if cfg.mode == "sparsegpt" else masks
        counts = layer_counts(backend, record, before, decided)
        # ratios of the weights this stage decided about; the manifest counts the carried ones
        ratios = decided_ratios(record, before) if cfg.save_ratios else {}
        return masks, counts, ratios

    def strategy_stage(self, stage: list[str]) -> tuple[dict, dict, dict]:
        """The strategy alone on one stage (``strategy_alone``): the probe path's masks and
        weights without its gradient passes (``GradProbe.prune_by_strategy``)."""
        job, cfg = self.job, self.job.cfg.prune
        masks = self.gradprobe(stage).prune_by_strategy(
            job.calibration, loss_fn_for(job.calibration), cfg.sparsity, cfg.num_batches,
            verbose=not self.bar.disable, allocation=_allocation(cfg), reconstruct=cfg.reconstruct)
        return masks, unprobed_counts(job.backend, stage, masks), {}

    def plain_sparsegpt(self, stage: list[str]) -> tuple[dict, dict, dict]:
        """SparseGPT without a probe on one stage (earlier stages already pruned): its local
        masks and per-layer counts."""
        job, cfg = self.job, self.job.cfg.prune
        nm = getattr(self.strategy, "nm", None)
        pruner = SparseGPT(job.model, backend=job.backend, pattern=f"{nm[0]}:{nm[1]}" if nm else None,
                           include=stage, extra_prunable=stage)
        masks = pruner.prune(job.calibration, cfg.sparsity, cfg.num_batches, loss_fn=loss_fn_for(job.calibration))
        return masks, unprobed_counts(job.backend, stage, masks), {}

    def gradprobe(self, stage: list[str]) -> GradProbe:
        """The probe of one stage, as configured."""
        cfg = self.job.cfg.prune
        return GradProbe(self.job.model, self.strategy, backend=self.job.backend, statistic=cfg.statistic,
                         stat_dtype=STAT_DTYPES[cfg.stat_dtype], include=stage, extra_prunable=stage,
                         cache_prefix=cfg.cache_prefix, prefix_cache_device=cfg.prefix_cache_device)


def strategy_alone(cfg: PruneConfig, strategy: PruningStrategy, round_: Round) -> bool:
    """Target mode with no veto is the strategy's own order unvetoed, so its masks are the
    strategy's own: selected without the probe's passes, whose measurement nothing would
    read. Not so for a gradient allocation (the probe's ratios set the layer sparsities),
    rounds (they rank the alive candidates by ratio) or a strategy without scores (ratio
    fallback)."""
    return (cfg.mode == "target" and cfg.veto == "none" and round_.count == 1
            and cfg.allocation.kind != "gradient" and isinstance(strategy, ScoredStrategy))


def unprobed_counts(backend: Backend, stage: list[str], masks: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Per-layer counts of a stage decided without a probe: every pruned weight counts as a
    candidate it kept none of (nothing carried, nothing restored)."""
    pruned = backend.sum_over_shards(torch.tensor([float(masks[n].count_nonzero()) for n in stage],
                                                  dtype=torch.float64)).long().tolist()
    return {n: {"candidates": p, "newly_pruned": p, "carried": 0} for n, p in zip(stage, pruned)}


def _allocation(cfg: PruneConfig) -> Allocation | None:
    """The configured allocation, None when uniform."""
    return cfg.allocation if cfg.allocation.kind != "uniform" else None


def _nothing_pruned(record: ProbeRecord) -> dict[str, torch.Tensor]:
    """``before`` masks of a first round: no weight pruned yet."""
    return {n: torch.zeros_like(layer.tentative) for n, layer in record.layers.items()}


def _check_agrees(ckpt, name: str, full: torch.Tensor) -> None:
    """A re-probed layer that differs from its checkpoint means the inputs changed."""
    differ = int((ckpt.load_layer(name) != full).count_nonzero())
    if differ:
        log.warning("layer %s was probed again after an interruption and %d of its mask bits "
                    "differ from its checkpoint, which keeps the saved mask while later stages "
                    "see the new one: the calibration data or the software changed; rerun "
                    "with --restart for a consistent result", name, differ)


class StagedRounds:
    """The pipeline's steps for ``rounds.run_rounds``: each round is the staged probe
    (``StageLoop``) into ``output_dir/round-NNN``, or into ``output_dir`` itself when
    pruning one-shot (there a finished run is resumed stage by stage, not skipped)."""

    def __init__(self, job, loop: StageLoop, final: RankZeroCheckpoint, redo_from_stage: int | None):
        self.job, self.loop, self.final, self.redo_from_stage = job, loop, final, redo_from_stage

    def directory(self, round_: Round) -> Path:
        output_dir = self.job.cfg.output_dir
        return Path(output_dir) if round_.count == 1 else round_dir(output_dir, round_.number)

    def open_round(self, round_: Round, restart: bool) -> RankZeroCheckpoint:
        if round_.count == 1:
            return self.final
        job = self.job
        config = {**mask_config(job.cfg, job.env.world_size), "round": round_.number}
        return job.open_checkpoint(restart, self.directory(round_), config, self.redo_from_stage)

    def is_done(self, round_: Round, store: RankZeroCheckpoint) -> bool:
        return round_.count > 1 and set(store.completed) == set(self.job.names)

    def load(self, store: RankZeroCheckpoint) -> None:
        self.job.apply_checkpoint(store, self.job.names)

    def run(self, round_: Round, store: RankZeroCheckpoint) -> None:
        if round_.count > 1 and self.job.show_progress:
            log.info("round %d/%d: pruning to %.2f%% (%s schedule) into %s", round_.number, round_.count,
                     100 * round_.sparsity, self.job.cfg.prune.schedule, self.directory(round_))
        self.loop.run_round(round_, store, self.directory(round_))
