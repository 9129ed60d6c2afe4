"""The pruning job: staged probing with a mask checkpoint per layer, resumable after a kill.

One code path for every launcher and parallel mode: the config picks the backend. Stages
run in model order; a stage probes only its own layers, on a network in which every earlier
stage's masks are already applied. Each decided layer goes to the checkpoint at once (the
main rank assembles one layer at a time from the shards), so a killed job loses at most the
stage in flight. On resume, fully checkpointed stages are applied and skipped; a stage that
was cut short is probed again whole (identical inputs give identical masks) and only its
missing layers are written.

With ``prune.rounds`` = k > 1 the staged probe runs k times, round r pruning to the
schedule's sparsity s_r (``iterative.schedule_values``: cubic or linear, from 0 up to
``prune.sparsity``) on the network every earlier round pruned. A round decides only among
the weights still alive, so masks only grow (``iterative.round_masks``); in target mode
each layer ends with exactly ``floor(s_r numel)`` pruned weights. Round r writes
``output_dir/round-NNN/``, a full mask checkpoint of every mask so far; the last round's
masks are then copied to ``output_dir`` itself, where ``inspect``, ``eval`` and ``export``
look. On resume, completed rounds are skipped (the last one's masks applied) and a round
cut short resumes stage by stage; a round that had to run discards any later round left
on disk, since it was built on other masks.
"""
from __future__ import annotations

import gc
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from fnmatch import fnmatch
from math import prod
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gradprobe_dist.parallel import Backend, build_backend
from gradprobe_dist.checkpoint.store import MaskCheckpoint, model_fingerprint
from gradprobe_dist.pipeline.config import RunConfig
from gradprobe_dist.data.loader import shard_batches, token_vocab_size
from gradprobe_dist.runtime.env import DistEnv
from gradprobe_dist.pipeline.evaluate import evaluate
from gradprobe_dist.pipeline.build import build_model
from gradprobe_dist.pipeline.rounds import layer_counts, round_masks, schedule_values, tentative_fraction
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.probe.params import find_prunable
from gradprobe_dist.probe.prefix import block_list
from gradprobe_dist.pipeline.plots import CARRIED_KEY, RATIO_KEY, ratio_tensors
from gradprobe_dist.probe.batches import is_lm_batch
from gradprobe_dist.probe.gradprobe import GradProbe
from gradprobe_dist.reconstruct.pruner import SparseGPT
from gradprobe_dist.strategies import build_strategy

log = get_logger(__name__)

STAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MainRankFailed(RuntimeError):
    """Raised on the other ranks when the main rank failed, so that no rank waits forever."""


@dataclass
class PruneResult:
    stages: int
    stages_skipped: int
    layers_written: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    sparsity: float = 0.0
    seconds: float = 0.0
    #: prune.rounds > 1: per round ``round``, ``schedule`` (s_r), ``sparsity`` (reached),
    #: ``directory`` and ``resumed`` (found complete on disk)
    rounds: list[dict] = field(default_factory=list)


@dataclass
class Round:
    """One pass of the staged probe over every stage. ``previous`` is the checkpoint of the
    round before (read on the main rank only; None elsewhere and in round 1)."""

    number: int
    count: int
    sparsity: float
    #: the strategy selects oversample x sparsity of each layer
    oversample: float
    previous: MaskCheckpoint | None = None

    @property
    def label(self) -> str:
        return f"round {self.number}/{self.count}, " if self.count > 1 else ""


#: the extra checkpoint tensor holding a layer's weights as SparseGPT / reconstruction left them
UPDATED_WEIGHT_KEY = "weight"


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


def round_dir(output_dir: str | Path, number: int) -> Path:
    return Path(output_dir) / f"round-{number:03d}"


# -- stage planning --------------------------------------------------------------------------
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


def build_configured_model(cfg: RunConfig, backend: Backend | None = None) -> nn.Module:
    """The model of ``cfg``, randomly initialised from ``cfg.seed`` unless ``model.path``
    loads weights: every rank and every command (prune, eval, export) gets the same one
    (sharded by ``backend`` as it loads, where the backend can)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, backend)


def loss_fn_for(batches: list) -> nn.Module | None:
    """Dict batches carry labels and the model computes its own loss; (inputs, targets)
    batches are classification."""
    return None if is_lm_batch(batches[0]) else nn.CrossEntropyLoss()


def bars_wanted(show_progress: bool) -> bool:
    """Progress bars only on a terminal: redrawn bars turn a log file into noise."""
    return show_progress and sys.stderr.isatty()


def publish(source: MaskCheckpoint, target: MaskCheckpoint, done: list[str]) -> None:
    """Main rank: copy the layers of ``source`` (the last round) missing from ``target``
    (``output_dir``), masks, stats and saved tensors unchanged."""
    for name in source.completed():
        if name not in done:
            target.copy_layer_from(source, name)


# -- the job ---------------------------------------------------------------------------------
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
        """This rank's calibration micro-batches, read on first use (eval needs none)."""
        if self._calibration is None:
            self._calibration = shard_batches(
                self.cfg.data.shards, micro_batch_size=self.cfg.data.micro_batch_size,
                num_batches=self.cfg.prune.num_batches, rank=self.env.rank,
                world_size=self.env.world_size, vocab_size=token_vocab_size(self.model))
        return self._calibration

    def on_main(self, fn):
        """Run ``fn`` on the main rank only; every rank raises if it failed (nobody hangs)."""
        result, error = None, None
        if self.env.is_main:
            try:
                result = fn()
            except Exception as err:  # re-raised on every rank below
                error = err
        status = self.backend.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if status is not None:
            raise MainRankFailed(f"the main rank failed: {status}")
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def mask_config(self) -> dict:
        """What a resume must match: the mask-changing config fields and the world size,
        which decides how calibration samples form the global batches."""
        return {**self.cfg.mask_fields(), "world_size": self.env.world_size}

    def open_checkpoint(self, restart: bool, directory: str | Path | None = None,
                        config: dict | None = None) -> tuple[MaskCheckpoint | None, list[str]]:
        """The main rank opens (or resumes) ``directory`` (default ``output_dir``, recording
        ``mask_config()``); every rank learns the done layers."""
        fingerprint = model_fingerprint(self.model)

        def open_it():
            ckpt = MaskCheckpoint.open(directory or self.cfg.output_dir, model_fingerprint=fingerprint,
                                       config=config or self.mask_config(), restart=restart)
            return ckpt, ckpt.completed()

        opened = self.on_main(open_it)
        ckpt, completed = opened if opened is not None else (None, None)
        return ckpt, self.backend.broadcast_object(completed)

    def read_checkpoint(self, directory: str) -> tuple[MaskCheckpoint | None, list[str]]:
        """A finished or partial checkpoint to apply (any world size wrote it), checked
        against this model: every layer must be a prunable weight of the same shape."""
        shapes = {name: list(p.shape) for name, p in self.model.named_parameters() if name in self.names}

        def read_it():
            ckpt = MaskCheckpoint.read(directory)
            for name in ckpt.completed():
                if name not in shapes:
                    raise ValueError(f"layer '{name}' of the mask checkpoint {directory} is not a "
                                     "prunable weight of the configured model; use the config the "
                                     "masks were made with (model.*)")
                if ckpt.layer_info(name)["shape"] != shapes[name]:
                    raise ValueError(f"layer '{name}' of the mask checkpoint {directory} has shape "
                                     f"{ckpt.layer_info(name)['shape']} but the configured model's "
                                     f"weight has shape {shapes[name]}; check model.options")
            return ckpt, ckpt.completed()

        opened = self.on_main(read_it)
        ckpt, completed = opened if opened is not None else (None, None)
        return ckpt, self.backend.broadcast_object(completed)

    def apply_checkpoint(self, ckpt: MaskCheckpoint | None, names: list[str]) -> None:
        """Zero the checkpointed masks of ``names``: the main rank reads each layer, the
        backend cuts it to every rank's local part (one layer in memory at a time)."""
        if not names:
            return
        self.backend.prepare(self.model, self.names)
        try:
            for name in names:
                weight = self.backend.local_weight(name)
                with torch.no_grad():
                    weight.masked_fill_(self._local_mask(ckpt, name), 0)
                    if self.backend.broadcast_object(self.on_main(lambda: has_saved_weight(ckpt, name))):
                        saved = self.on_main(lambda: saved_weight(ckpt, name))
                        weight.copy_(self.backend.scatter_full(name, saved).reshape(weight.shape))
            self.backend.commit_weights(names)
        finally:
            self.backend.release()

    def read_local_masks(self, ckpt: MaskCheckpoint | None, names: list[str]) -> dict[str, torch.Tensor]:
        """The checkpointed masks of ``names``, as this rank's local parts (nothing applied)."""
        self.backend.prepare(self.model, self.names)
        try:
            return {name: self._local_mask(ckpt, name) for name in names}
        finally:
            self.backend.release()

    def _local_mask(self, ckpt: MaskCheckpoint | None, name: str) -> torch.Tensor:
        """One layer's mask, read on the main rank and cut to this rank's part (backend prepared)."""
        local = self.backend.scatter_full(name, self.on_main(lambda: ckpt.load_layer(name)))
        return local.to(self.backend.local_weight(name).device)

    # -- pruning -------------------------------------------------------------------------------
    def run(self, restart: bool = False) -> PruneResult:
        """Prune every stage (of every round) not yet checkpointed; returns the summary of
        ``output_dir``."""
        start = time.perf_counter()
        cfg = self.cfg.prune
        strategy = build_strategy(cfg.strategy, **cfg.strategy_options)
        _ = self.calibration  # bad data fails here, before a checkpoint records its path
        result = PruneResult(stages=len(self.stages) * cfg.rounds, stages_skipped=0)
        bars = bars_wanted(self.show_progress)
        with logging_redirect_tqdm([logging.getLogger("gradprobe_dist")]) if bars else nullcontext():
            with tqdm(total=result.stages, desc="stages", disable=not bars) as bar:
                if cfg.rounds == 1:
                    final, completed = self.open_checkpoint(restart)
                    one_shot = Round(1, 1, cfg.sparsity, cfg.oversample if cfg.mode in ("target", "sparsegpt") else 1.0)
                    self._run_round(one_shot, final, completed, self.cfg.output_dir, strategy, result, bar)
                else:
                    final = self._run_rounds(restart, strategy, result, bar)
        result.sparsity = GradProbe(self.model, strategy, backend=self.backend,
                                    include=self.names, extra_prunable=self.names).get_sparsity()
        result.rows = self.backend.broadcast_object(self.on_main(lambda: final.summary_rows()))
        result.seconds = time.perf_counter() - start
        return result

    def _run_rounds(self, restart: bool, strategy, result: PruneResult, bar) -> MaskCheckpoint | None:
        """Rounds 1..k into ``output_dir/round-NNN`` (see the module docstring), then the last
        round's masks copied to ``output_dir``, which is opened first so that a resume with
        other settings (``prune.rounds`` included) is refused before anything runs."""
        cfg = self.cfg.prune
        final, published = self.open_checkpoint(restart)
        values = schedule_values(cfg.sparsity, cfg.rounds, cfg.schedule)
        oversample = cfg.oversample if cfg.mode == "target" else 1.0
        previous, applied, recompute = None, True, restart
        for number, sparsity in enumerate(values, start=1):
            directory = round_dir(self.cfg.output_dir, number)
            ckpt, completed = self.open_checkpoint(recompute, directory, {**self.mask_config(), "round": number})
            resumed = set(completed) == set(self.names)
            if resumed:
                result.stages_skipped += len(self.stages)
                bar.update(len(self.stages))
            else:
                if not applied:  # the model must hold the previous round's masks
                    self.apply_checkpoint(previous, self.names)
                if self.show_progress:
                    log.info("round %d/%d: pruning to %.2f%% (%s schedule) into %s", number,
                             cfg.rounds, 100 * sparsity, cfg.schedule, directory)
                # the strategy selects the pruned zeros again plus the round's increment, oversampled
                selection = tentative_fraction(values, number, oversample)
                self._run_round(Round(number, cfg.rounds, sparsity, max(1.0, selection / sparsity), previous),
                                ckpt, completed, directory, strategy, result, bar)
                recompute = True  # a later round on disk was built on other masks
            applied, previous = not resumed, ckpt
            result.rounds.append(self._round_row(number, sparsity, ckpt, directory, resumed))
        if not applied:
            self.apply_checkpoint(previous, self.names)
        if recompute and published:  # new masks: what output_dir held is out of date
            final, published = self.open_checkpoint(True)
        self.on_main(lambda: publish(previous, final, published))
        return final

    def _round_row(self, number: int, sparsity: float, ckpt: MaskCheckpoint | None, directory: Path,
                   resumed: bool) -> dict:
        rows = self.backend.broadcast_object(self.on_main(lambda: ckpt.summary_rows()))
        reached = sum(r["pruned"] for r in rows) / sum(prod(r["shape"]) for r in rows)
        if self.show_progress:
            log.info("round %d/%d: sparsity %.2f%% (schedule %.2f%%)%s", number, self.cfg.prune.rounds,
                     100 * reached, 100 * sparsity, ", resumed from disk" if resumed else "")
        return {"round": number, "schedule": sparsity, "sparsity": reached, "directory": str(directory),
                "resumed": resumed}

    def _run_round(self, round_: Round, ckpt: MaskCheckpoint | None, completed: list[str],
                   directory: str | Path, strategy, result: PruneResult, bar) -> None:
        """Every stage of one round not yet in ``ckpt``; finished stages are applied."""
        done = set(completed)
        finished = [s for s in self.stages if all(n in done for n in s)]
        self.apply_checkpoint(ckpt, [n for s in finished for n in s])
        result.stages_skipped += len(finished)
        bar.update(len(finished))
        if finished and self.show_progress:
            log.info("%sresuming: %d of %d stages already in %s, not recomputed", round_.label,
                     len(finished), len(self.stages), directory)
        bars = not bar.disable
        for index, stage in enumerate(self.stages):
            if stage not in finished:
                written = self._run_stage(index, stage, strategy, ckpt, done, round_, bars)
                prefix = f"{Path(directory).name}/" if round_.count > 1 else ""
                result.layers_written += [prefix + name for name in written]
                bar.update(1)

    def _run_stage(self, index: int, stage: list[str], strategy, ckpt: MaskCheckpoint | None,
                   done: set[str], round_: Round, bars: bool) -> list[str]:
        """Probe one stage, then gather and save each of its layers not yet checkpointed."""
        cfg = self.cfg.prune
        if self.show_progress:
            log.info("%sstage %d/%d: probing %d layers (%s ... %s)", round_.label, index + 1,
                     len(self.stages), len(stage), stage[0], stage[-1])
        stage_start = time.perf_counter()
        before = self.read_local_masks(round_.previous, stage) if round_.number > 1 else {}
        if cfg.mode == "sparsegpt" and cfg.veto == "none":
            masks, counts, ratios = self._plain_sparsegpt(stage, strategy)
        else:
            masks, counts, ratios = self._probe_stage(stage, strategy, before, round_, bars)
        # weights the method moved beyond the zeros: the checkpoint keeps them for export
        updated = {n: self.backend.local_weight(n) for n in stage} if cfg.mode == "sparsegpt" or cfg.reconstruct else {}
        seconds = (time.perf_counter() - stage_start) / len(stage)
        written = []
        for name in stage:
            full = self.backend.gather_full(name, masks[name])
            ratio = self.backend.gather_full(name, ratios[name]) if name in ratios else None
            weight = self.backend.gather_full(name, updated[name]) if name in updated else None
            if name in done:  # saved before an interruption: the probe must have agreed
                self.on_main(lambda: self._check_agrees(ckpt, name, full))
                continue
            c = counts[name]
            stats = {"tentative": c["candidates"], "restored": c["candidates"] - c["newly_pruned"],
                     "seconds": round(seconds, 4), "stage": index}
            if round_.count > 1:
                stats.update({"round": round_.number, CARRIED_KEY: c["carried"]})
            tensors = {RATIO_KEY: ratio[~ratio.isnan()]} if ratio is not None else {}
            if weight is not None:
                tensors[UPDATED_WEIGHT_KEY] = weight.reshape(full.shape)
            self.on_main(lambda: ckpt.save_layer(name, full, stats=stats, tensors=tensors))
            written.append(name)
            if self.show_progress:
                info = ckpt.layer_info(name)
                log.info("%sstage %d/%d: %s %s pruned %d/%d (%.1f%%), restored %d", round_.label,
                         index + 1, len(self.stages), name, "x".join(map(str, info["shape"])),
                         info["pruned"], info["numel"], 100 * info["sparsity"], info["restored"])
        return written

    def _probe_stage(self, stage: list[str], strategy, before: dict[str, torch.Tensor], round_: Round,
                     bars: bool) -> tuple[dict, dict, dict]:
        """GradProbe on one stage: its local masks, per-layer counts and gradient ratios."""
        cfg = self.cfg.prune
        probe = GradProbe(self.model, strategy, backend=self.backend, statistic=cfg.statistic,
                          stat_dtype=STAT_DTYPES[cfg.stat_dtype], include=stage,
                          extra_prunable=stage, cache_prefix=cfg.cache_prefix,
                          prefix_cache_device=cfg.prefix_cache_device)
        record = probe.probe(self.calibration, loss_fn_for(self.calibration), round_.sparsity,
                             cfg.num_batches, cfg.reduction_factor, verbose=bars,
                             oversample=round_.oversample,
                             allocation=cfg.allocation if cfg.allocation.kind != "uniform" else None,
                             hessians=cfg.reconstruct or cfg.mode == "sparsegpt")
        before = before or {n: torch.zeros_like(layer.tentative) for n, layer in record.layers.items()}
        if round_.count == 1:
            masks = probe.decide(record, cfg.sparsity, mode=cfg.mode, gradient_threshold=cfg.gradient_threshold,
                                 target_scope=cfg.target_scope, reconstruct=cfg.reconstruct,
                                 veto_fraction=cfg.veto_fraction if cfg.veto == "fraction" else None)
        else:
            masks = probe.apply_masks(record, round_masks(self.backend, record, before, round_.sparsity,
                                                          cfg.mode, cfg.gradient_threshold, cfg.target_scope))
        # SparseGPT may prune weights the strategy never proposed: count only the candidates
        decided = {n: m & record.layers[n].tentative for n, m in masks.items()} if cfg.mode == "sparsegpt" else masks
        counts = layer_counts(self.backend, record, before, decided)
        # ratios of the weights this stage decided about; the manifest counts the carried ones
        ratios = {n: r.masked_fill(before[n].to(r.device), float("nan"))
                  for n, r in ratio_tensors(record).items()} if cfg.save_ratios else {}
        return masks, counts, ratios

    def _plain_sparsegpt(self, stage: list[str], strategy) -> tuple[dict, dict, dict]:
        """SparseGPT without a probe on one stage (earlier stages already pruned): its local
        masks and per-layer counts (every pruned weight counts as a candidate it kept none of)."""
        cfg = self.cfg.prune
        nm = getattr(strategy, "nm", None)
        pruner = SparseGPT(self.model, backend=self.backend, pattern=f"{nm[0]}:{nm[1]}" if nm else None,
                           include=stage, extra_prunable=stage)
        masks = pruner.prune(self.calibration, cfg.sparsity, cfg.num_batches,
                             loss_fn=loss_fn_for(self.calibration))
        pruned = self.backend.sum_over_shards(torch.tensor([float(masks[n].sum()) for n in stage],
                                                           dtype=torch.float64)).long().tolist()
        counts = {n: {"candidates": p, "newly_pruned": p, "carried": 0} for n, p in zip(stage, pruned)}
        return masks, counts, {}

    @staticmethod
    def _check_agrees(ckpt: MaskCheckpoint, name: str, full: torch.Tensor) -> None:
        """A re-probed layer that differs from its checkpoint means the inputs changed."""
        differ = int((ckpt.load_layer(name) != full).sum())
        if differ:
            log.warning("layer %s was probed again after an interruption and %d of its mask bits "
                        "differ from its checkpoint, which keeps the saved mask while later stages "
                        "see the new one: the calibration data or the software changed; rerun "
                        "with --restart for a consistent result", name, differ)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Loss/perplexity or accuracy of the model as it is now, on ``data.eval_shards``
        (``data.eval_batches`` micro-batches per rank, summed over ranks)."""
        data = self.cfg.data
        if not data.eval_shards:
            raise ValueError("no evaluation data: set data.eval_shards to a shard directory "
                             "(write one with `gradprobe make-shards --bundled valid`)")
        if self._eval_batches is None:
            self._eval_batches = shard_batches(
                data.eval_shards, micro_batch_size=data.micro_batch_size,
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
