"""The pruning job: built from a config, staged probing (``stages.py``) into a mask
checkpoint per layer, optionally in rounds, resumable after a kill.

One code path for every launcher and parallel mode: the config picks the backend. The main
rank holds a lock on ``output_dir`` for the whole run, so a second job on it is refused.

With ``prune.rounds`` = k > 1 the staged probe runs k times, round r pruning to the
schedule's sparsity s_r (``rounds.schedule_values``: cubic or linear, from 0 up to
``prune.sparsity``) on the network every earlier round pruned. A round decides only among
the weights still alive, so masks only grow (``rounds.round_masks``); in target mode each
layer ends with exactly ``floor(s_r numel)`` pruned weights. Round r writes
``output_dir/round-NNN/``, a full mask checkpoint of every mask so far; the last round's
masks are then copied to ``output_dir`` itself, where ``inspect``, ``eval`` and ``export``
look. On resume, completed rounds are skipped (the last one's masks applied) and a round
cut short resumes stage by stage; a round that had to run discards any later round left on
disk, since it was built on other masks.
"""
from __future__ import annotations

import gc
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gradprobe_dist.checkpoint.format import UPDATED_WEIGHT_KEY, model_fingerprint, tensor_sha256
from gradprobe_dist.checkpoint.relay import RankZeroCheckpoint, lock_directory
from gradprobe_dist.checkpoint.store import MaskCheckpoint
from gradprobe_dist.data.loader import shard_batches, token_vocab_size
from gradprobe_dist.parallel import Backend, build_backend
from gradprobe_dist.pipeline.build import build_model
from gradprobe_dist.pipeline.config import RunConfig
from gradprobe_dist.pipeline.evaluate import evaluate
from gradprobe_dist.pipeline.inputs import mask_config, read_calibration
from gradprobe_dist.pipeline.rounds import Round, plan_rounds, round_dir, run_rounds
from gradprobe_dist.pipeline.stages import STAT_DTYPES, StageLoop, StagedRounds, loss_fn_for, plan_stages
from gradprobe_dist.probe.gradprobe import GradProbe
from gradprobe_dist.probe.params import find_prunable
from gradprobe_dist.runtime.env import DistEnv
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.strategies import build_strategy

log = get_logger(__name__)


@dataclass
class PruneResult:
    stages: int
    stages_resumed: int
    layers_written: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    sparsity: float = 0.0
    seconds: float = 0.0
    #: prune.rounds > 1: per round ``round``, ``schedule`` (s_r), ``sparsity`` (reached),
    #: ``directory`` and ``resumed`` (found complete on disk)
    rounds: list[dict] = field(default_factory=list)


def build_configured_model(cfg: RunConfig, backend: Backend | None = None) -> nn.Module:
    """The model of ``cfg``, randomly initialised from ``cfg.seed`` unless ``model.path``
    loads weights: every rank and every command (prune, eval, export) gets the same one
    (sharded by ``backend`` as it loads, where the backend can)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, backend)


def has_saved_weight(ckpt: MaskCheckpoint, name: str) -> bool:
    return UPDATED_WEIGHT_KEY in ckpt.layer_info(name).get("tensors", [])


def saved_weight(ckpt: MaskCheckpoint, name: str) -> torch.Tensor | None:
    """The layer's weights as saved when the method changed more than the masked zeros."""
    return ckpt.load_layer_tensors(name)[UPDATED_WEIGHT_KEY] if has_saved_weight(ckpt, name) else None


def apply_saved_weights(model: nn.Module, ckpt: MaskCheckpoint) -> list[str]:
    """Copy every saved layer weight of ``ckpt`` into the unwrapped ``model``; returns the names."""
    params = dict(model.named_parameters())
    names = [n for n in ckpt.completed() if has_saved_weight(ckpt, n)]
    with torch.no_grad():
        for name in names:
            params[name].copy_(saved_weight(ckpt, name).reshape(params[name].shape))
    return names


def bars_wanted(show_progress: bool) -> bool:
    """Progress bars only on a terminal: redrawn bars turn a log file into noise."""
    return show_progress and sys.stderr.isatty()


def publish(source: RankZeroCheckpoint, target: RankZeroCheckpoint, done: list[str]) -> None:
    """Copy the layers of ``source`` (the last round) missing from ``target`` (``output_dir``),
    masks, stats and saved tensors unchanged, on the main rank."""
    def copy(ckpt):
        for name in source.checkpoint.completed():
            if name not in done:
                ckpt.copy_layer_from(source.checkpoint, name)
    target.on_main(copy)


class PruneJob:
    """Builds model and backend from a config; prunes in stages, evaluates, sweeps.

    Use it as a context manager: on success, ``close`` tears down in an order that lets every
    rank exit cleanly (after a failure nothing waits for the other ranks).
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, *, show_progress: bool = True):
        if cfg.parallel == "none" and env.world_size > 1:
            raise ValueError(f"parallel: none runs in one process, but {env.world_size} ranks were "
                             "launched: set parallel=ddp, fsdp or zero3, or launch one process")
        parallel = cfg.parallel
        if env.backend is None and parallel != "none":
            log.info("one process without a launcher: running parallel=%s as parallel=none "
                     "(the masks do not depend on the parallel mode)", parallel)
            parallel = "none"
        self.cfg, self.env = cfg, env
        self.show_progress = show_progress and env.is_main
        self.backend: Backend = build_backend(parallel, env.device, fsdp_units=cfg.fsdp_units,
                                              micro_batch_size=cfg.data.micro_batch_size)
        self.model = build_configured_model(cfg, self.backend)
        self.names = list(find_prunable(self.model, cfg.model.include, cfg.model.exclude,
                                        cfg.model.extra_prunable))
        self.stages = plan_stages(self.model, self.names, cfg.prune.stage_size, cfg.prune.stages)
        self._calibration: list | None = None
        self._eval_batches: list | None = None
        self._fingerprint: dict | None = None

    def __enter__(self) -> PruneJob:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def close(self) -> None:
        """Every rank past its last collective, then the backend's engine torn down while the
        process group still exists (DeepSpeed's hooks and group handles otherwise die in
        arbitrary order at interpreter exit); the caller destroys the process group after."""
        self.backend.barrier()
        self.backend.close()
        del self.model, self.backend, self._calibration, self._eval_batches
        gc.collect()

    @property
    def calibration(self) -> list:
        """This rank's calibration micro-batches for the probe, read on first use (eval needs none)."""
        return self._read_calibration()[:self.cfg.prune.num_batches]

    @property
    def guard_calibration(self) -> list:
        """The batches the guard scores on: the ``prune.guard_batches`` read after the probe's,
        or the probe's own when that is 0."""
        return self._read_calibration()[self.cfg.prune.num_batches:] or self.calibration

    def _read_calibration(self) -> list:
        if self._calibration is None:
            self._calibration = read_calibration(self.cfg, rank=self.env.rank, world_size=self.env.world_size,
                                                 vocab_size=token_vocab_size(self.model))
        return self._calibration

    # -- checkpoints ---------------------------------------------------------------------------
    def take_fingerprint(self) -> None:
        """Shapes and dtypes of every parameter and the sha256 of every prunable weight as
        built, before any mask, for the main rank to record or compare. Every rank takes part:
        a weight loaded sharded is gathered whole (one at a time) for the main rank to hash.
        Hashing costs about 6 s per GB of weights on one busy CPU core, once per run."""
        hashes = {}
        for name, param in self.model.named_parameters():
            if name in self.names:
                full = self.backend.gather_parameter(param)
                if full is not None:
                    hashes[name] = tensor_sha256(full)
        self._fingerprint = model_fingerprint(self.model, hashes)

    def fingerprint(self) -> dict:
        """The fingerprint ``take_fingerprint`` took (main rank)."""
        return self._fingerprint

    def open_checkpoint(self, restart: bool, directory: str | Path | None = None,
                        config: dict | None = None, redo_from_stage: int | None = None
                        ) -> RankZeroCheckpoint:
        """The main rank opens (or resumes) ``directory`` (default ``output_dir``, recording
        ``mask_config``), first forgetting stage ``redo_from_stage`` (1-based) and every later
        one if asked; every rank learns the done layers."""
        config = config or mask_config(self.cfg, self.env.world_size)
        return RankZeroCheckpoint.open(self.backend, directory or self.cfg.output_dir,
                                       fingerprint=self.fingerprint, config=config,
                                       restart=restart, planned=self.names,
                                       drop_from_stage=None if redo_from_stage is None else redo_from_stage - 1)

    def read_checkpoint(self, directory: str, allow_partial: bool = False) -> RankZeroCheckpoint:
        """A finished checkpoint to apply (any world size wrote it), checked against this model:
        every layer must be a prunable weight of the same shape, and every prunable weight
        must be there unless ``allow_partial``."""
        shapes = {name: list(p.shape) for name, p in self.model.named_parameters() if name in self.names}

        def check(ckpt):
            for name in ckpt.completed():
                if name not in shapes:
                    raise ValueError(f"layer '{name}' of the mask checkpoint {directory} is not a "
                                     "prunable weight of the configured model; use the config the "
                                     "masks were made with (model.*)")
                if ckpt.layer_info(name)["shape"] != shapes[name]:
                    raise ValueError(f"layer '{name}' of the mask checkpoint {directory} has shape "
                                     f"{ckpt.layer_info(name)['shape']} but the configured model's "
                                     f"weight has shape {shapes[name]}; check model.options")
            if not allow_partial:
                ckpt.check_complete(planned=self.names)

        return RankZeroCheckpoint.read(self.backend, directory, check)

    def apply_checkpoint(self, store: RankZeroCheckpoint, names: list[str]) -> None:
        """Zero the checkpointed masks of ``names``: the main rank reads each layer, the
        backend cuts it to every rank's local part (one layer in memory at a time)."""
        if not names:
            return
        self.backend.prepare(self.model, self.names)
        try:
            for name in names:
                weight = self.backend.local_weight(name)
                with torch.no_grad():
                    weight.masked_fill_(store.local_mask(name), 0)
                    if store.on_main(lambda ckpt: has_saved_weight(ckpt, name), share=True):
                        saved = store.on_main(lambda ckpt: saved_weight(ckpt, name))
                        weight.copy_(self.backend.scatter_full(name, saved).reshape(weight.shape))
            self.backend.commit_weights(names)
        finally:
            self.backend.release()

    def read_local_masks(self, store: RankZeroCheckpoint, names: list[str]) -> dict[str, torch.Tensor]:
        """The checkpointed masks of ``names``, as this rank's local parts (nothing applied)."""
        self.backend.prepare(self.model, self.names)
        try:
            return {name: store.local_mask(name) for name in names}
        finally:
            self.backend.release()

    # -- pruning -------------------------------------------------------------------------------
    def run(self, restart: bool = False, redo_from_stage: int | None = None) -> PruneResult:
        """Prune every stage (of every round) not yet checkpointed, holding the lock on
        ``output_dir``; returns the summary of ``output_dir``. ``redo_from_stage`` (1-based)
        first forgets that stage and every later one (in every round), keeping the earlier."""
        _ = self.calibration  # bad data fails here, before output_dir exists or a checkpoint records its path
        lock = lock_directory(self.backend, self.cfg.output_dir)
        try:
            self.take_fingerprint()
            return self._run(restart, redo_from_stage)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, restart: bool, redo_from_stage: int | None) -> PruneResult:
        start = time.perf_counter()
        cfg = self.cfg.prune
        if redo_from_stage is not None and not 1 <= redo_from_stage <= len(self.stages):
            raise ValueError(f"--redo-from-stage {redo_from_stage} is not a stage: this config has "
                             f"stages 1 to {len(self.stages)}")
        strategy = build_strategy(cfg.strategy, **cfg.strategy_options)
        result = PruneResult(stages=len(self.stages) * cfg.rounds, stages_resumed=0)
        plan = (plan_rounds(cfg.sparsity, cfg.rounds, cfg.schedule, cfg.oversample if cfg.mode == "target" else 1.0)
                if cfg.rounds > 1 else
                [Round(1, 1, cfg.sparsity, cfg.oversample if cfg.mode in ("target", "sparsegpt") else 1.0)])
        bars = bars_wanted(self.show_progress)
        with logging_redirect_tqdm([logging.getLogger("gradprobe_dist")]) if bars else nullcontext():
            with tqdm(total=result.stages, desc="stages", disable=not bars) as bar:
                # output_dir first: a resume with other settings (prune.rounds too) is refused
                # before anything runs
                final = self.open_checkpoint(restart, redo_from_stage=redo_from_stage)
                steps = StagedRounds(self, StageLoop(self, strategy, result, bar), final, redo_from_stage)
                done = run_rounds(plan, steps, restart)
                if cfg.rounds > 1:
                    final = self._publish(done, final, result, bar)
        result.sparsity = GradProbe(self.model, strategy, backend=self.backend,
                                    include=self.names, extra_prunable=self.names).get_sparsity()
        result.rows = final.summary_rows()
        result.seconds = time.perf_counter() - start
        return result

    def _publish(self, done: list, final: RankZeroCheckpoint, result: PruneResult, bar) -> RankZeroCheckpoint:
        """After rounds: one row per round, then the last round's masks copied to ``output_dir``
        (emptied first if any round ran: what it held was built on other masks)."""
        for round_, store, resumed in done:
            if resumed:
                result.stages_resumed += len(self.stages)
                bar.update(len(self.stages))
            result.rounds.append(self._round_row(round_, store, round_dir(self.cfg.output_dir, round_.number),
                                                 resumed))
        if not all(resumed for _, _, resumed in done) and final.completed:
            final = self.open_checkpoint(True)
        publish(done[-1][1], final, final.completed)
        return final

    def _round_row(self, round_: Round, store: RankZeroCheckpoint, directory: Path, resumed: bool) -> dict:
        rows = store.summary_rows()
        reached = sum(r["pruned"] for r in rows) / sum(prod(r["shape"]) for r in rows)
        if self.show_progress:
            log.info("round %d/%d: sparsity %.2f%% (schedule %.2f%%)%s", round_.number, round_.count,
                     100 * reached, 100 * round_.sparsity, ", resumed from disk" if resumed else "")
        return {"round": round_.number, "schedule": round_.sparsity, "sparsity": reached,
                "directory": str(directory), "resumed": resumed}

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Loss/perplexity or accuracy of the model as it is now, on ``data.eval_shards``
        (``data.eval_batches`` micro-batches of ``data.eval_batch_size`` per rank, summed over ranks)."""
        data = self.cfg.data
        if not data.eval_shards:
            raise ValueError("no evaluation data: set data.eval_shards to a shard directory "
                             "(write one with `gradprobe make-shards --bundled valid`)")
        if self._eval_batches is None:
            self._eval_batches = shard_batches(
                data.eval_shards, micro_batch_size=data.eval_batch_size,
                num_batches=data.eval_batches, rank=self.env.rank, world_size=self.env.world_size,
                vocab_size=token_vocab_size(self.model))
        wrapped = self.backend.prepare(self.model, self.names)
        try:
            return evaluate(wrapped, self._eval_batches, self.backend)
        finally:
            self.backend.release()

    def sweep(self, *, show_progress: bool) -> dict[str, list]:
        """One probe of every prunable weight, each ``prune.thresholds`` value decided and
        evaluated on ``data.eval_shards``; the model ends as it started. No stages, no
        checkpoint: the sweep chooses a threshold for ``prune``."""
        cfg = self.cfg.prune
        strategy = build_strategy(cfg.strategy, **cfg.strategy_options)
        probe = GradProbe(self.model, strategy, backend=self.backend, statistic=cfg.statistic,
                          stat_dtype=STAT_DTYPES[cfg.stat_dtype], include=self.names,
                          extra_prunable=self.names)
        return probe.sweep_gradient_thresholds(
            self.calibration, loss_fn_for(self.calibration), lambda model: self.evaluate(),
            sparsity=cfg.sparsity, thresholds=cfg.thresholds, num_batches=cfg.num_batches,
            verbose=bars_wanted(show_progress and self.env.is_main),
            reduction_factor=cfg.reduction_factor)
