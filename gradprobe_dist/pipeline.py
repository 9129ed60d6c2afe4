"""The pruning job: staged probing with a mask checkpoint per layer, resumable after a kill.

One code path for every launcher and parallel mode: the config picks the backend. Stages
run in model order; a stage probes only its own layers, on a network in which every earlier
stage's masks are already applied. Each decided layer goes to the checkpoint at once (the
main rank assembles one layer at a time from the shards), so a killed job loses at most the
stage in flight. On resume, fully checkpointed stages are applied and skipped; a stage that
was cut short is probed again whole (identical inputs give identical masks) and only its
missing layers are written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .backends import Backend, build_backend
from .checkpoint import MaskCheckpoint, model_fingerprint
from .config import RunConfig
from .data.loader import calibration_batches
from .distributed.env import DistEnv
from .evaluate import evaluate
from .factory import build_model
from .log import get_logger
from .params import find_prunable
from .probe import GradProbe
from .strategies import build_strategy

log = get_logger(__name__)

STAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PruneResult:
    stages: int
    stages_skipped: int
    layers_written: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    sparsity: float = 0.0
    seconds: float = 0.0


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
    prefix, count = _block_list(model, names)
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


def _block_list(model: nn.Module, names: list[str]) -> tuple[str | None, int]:
    """The ModuleList holding the most prunable parameters: its name prefix and length."""
    best, best_count = None, 0
    for mname, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{mname}." if mname else ""
            count = sum(n.startswith(prefix) for n in names)
            if count > best_count:
                best, best_count = prefix, count
    return best, best_count


# -- the job ---------------------------------------------------------------------------------
class PruneJob:
    """Builds model, backend, data and checkpoint from a config; runs stages."""

    def __init__(self, cfg: RunConfig, env: DistEnv, *, show_progress: bool = True):
        if cfg.parallel == "none" and env.world_size > 1:
            raise ValueError(f"parallel: none runs in one process, but {env.world_size} ranks were "
                             "launched: set parallel=ddp, fsdp or zero3, or launch one process")
        self.cfg, self.env = cfg, env
        self.show_progress = show_progress and env.is_main
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model)
        self.names = list(find_prunable(self.model, cfg.model.include, cfg.model.exclude))
        self.stages = plan_stages(self.model, self.names, cfg.prune.stage_size, cfg.prune.stages)
        self.backend: Backend = build_backend(cfg.parallel, env.device, fsdp_units=cfg.fsdp_units,
                                              micro_batch_size=cfg.data.micro_batch_size)
        self.batches = calibration_batches(cfg.data.shards, micro_batch_size=cfg.data.micro_batch_size,
                                           num_batches=cfg.prune.num_batches, rank=env.rank,
                                           world_size=env.world_size)

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
            raise RuntimeError(f"the main rank failed: {status}")
        return result

    def open_checkpoint(self, restart: bool) -> tuple[MaskCheckpoint | None, list[str]]:
        fingerprint = model_fingerprint(self.model)

        def open_it():
            ckpt = MaskCheckpoint.open(self.cfg.output_dir, model_fingerprint=fingerprint,
                                       config=self.cfg.mask_fields(), restart=restart)
            return ckpt, ckpt.completed()

        opened = self.on_main(open_it)
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
                local = self.backend.scatter_full(name, self.on_main(lambda: ckpt.load_layer(name)))
                with torch.no_grad():
                    weight = self.backend.local_weight(name)
                    weight.masked_fill_(local.to(weight.device), 0)
            self.backend.commit_weights(names)
        finally:
            self.backend.release()

    def run(self, restart: bool = False) -> PruneResult:
        start = time.perf_counter()
        cfg = self.cfg.prune
        ckpt, completed = self.open_checkpoint(restart)
        done = set(completed)
        finished = [s for s in self.stages if all(n in done for n in s)]
        self.apply_checkpoint(ckpt, [n for s in finished for n in s])
        result = PruneResult(stages=len(self.stages), stages_skipped=len(finished))
        if finished and self.env.is_main:
            log.info("resuming: %d of %d stages already in %s", len(finished), len(self.stages),
                     self.cfg.output_dir)
        strategy = build_strategy(cfg.strategy, **cfg.strategy_options)
        bar = tqdm(total=len(self.stages), desc="stages", disable=not self.show_progress,
                   initial=len(finished))
        for index, stage in enumerate(self.stages):
            if stage in finished:
                continue
            stage_start = time.perf_counter()
            probe = GradProbe(self.model, strategy, backend=self.backend, statistic=cfg.statistic,
                              stat_dtype=STAT_DTYPES[cfg.stat_dtype], include=stage)
            record = probe.probe(self.batches, None if isinstance(self.batches[0], dict) else nn.CrossEntropyLoss(),
                                 cfg.sparsity, cfg.num_batches, cfg.reduction_factor,
                                 verbose=False)  # the stage bar and layer lines are the progress
            masks = probe.apply_decisions(record, cfg.gradient_threshold)
            seconds = time.perf_counter() - stage_start
            for name in stage:
                tentative = self.backend.sum_over_shards(
                    torch.tensor([int(record.layers[name].tentative.sum())], dtype=torch.int64)).item()
                full = self.backend.gather_full(name, masks[name])
                if name in done:
                    continue
                stats = {"tentative": int(tentative), "restored": int(tentative - full.sum()) if full is not None else 0,
                         "seconds": round(seconds / len(stage), 4), "stage": index}
                self.on_main(lambda: ckpt.save_layer(name, full, stats=stats))
                result.layers_written.append(name)
                if self.show_progress:
                    info = ckpt.layer_info(name)
                    tqdm.write(f"[rank 0] stage {index}: {name} {info['shape']} pruned "
                               f"{info['pruned']}/{info['numel']} ({100 * info['sparsity']:.1f}%), "
                               f"restored {info['restored']}")
            bar.update(1)
        bar.close()
        result.sparsity = GradProbe(self.model, strategy, backend=self.backend,
                                    include=self.names).get_sparsity()
        result.rows = self.backend.broadcast_object(ckpt.summary_rows() if ckpt is not None else None)
        result.seconds = time.perf_counter() - start
        return result

    def evaluate(self, shards: str, num_batches: int) -> dict[str, float]:
        batches = calibration_batches(shards, micro_batch_size=self.cfg.data.micro_batch_size,
                                      num_batches=num_batches, rank=self.env.rank,
                                      world_size=self.env.world_size)
        wrapped = self.backend.prepare(self.model, self.names)
        try:
            return evaluate(wrapped, batches, self.backend)
        finally:
            self.backend.release()
