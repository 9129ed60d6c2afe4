"""Run configs: plain dataclasses that YAML maps onto one-to-one.

Unknown keys, wrong types and out-of-range values are errors naming the key (e.g.
``prune.sparsity``). ``key=value`` overrides on the command line use dotted paths and
YAML syntax for values: ``prune.sparsity=0.6 parallel=fsdp prune.stages=[[a*],[b*]]``.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gradprobe_dist.strategies.allocation import Allocation
from gradprobe_dist.probe.stats import STATISTICS
from gradprobe_dist.probe.validation import check_guard, check_prune_args, check_threshold, is_int

PARALLEL_MODES = ("none", "ddp", "fsdp", "zero3")
MODEL_KINDS = ("tinygpt", "mlp", "hf")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    #: tinygpt (built-in LM), mlp (SimpleMLP) or hf (a transformers causal LM directory)
    kind: str = "tinygpt"
    #: hf: the model directory; tinygpt/mlp: a safetensors/.pt state dict to load (optional)
    path: str | None = None
    #: constructor options of the built-in model (TinyGPTConfig fields, or SimpleMLP args)
    options: dict[str, Any] = field(default_factory=dict)
    #: fnmatch patterns narrowing the prunable parameters, which are Linear/Conv weights
    #: (no embedding, no output head): include keeps the matches, exclude drops them
    include: list[str] | None = None
    exclude: list[str] | None = None
    #: fnmatch patterns of other parameters to prune too (biases, norm weights): explicit,
    #: since pruning them is rarely intended
    extra_prunable: list[str] | None = None
    #: let prune/sweep/eval/export use a randomly initialised built-in model (from ``seed``)
    #: when model.path is unset (tests, smoke runs); without it an unset path is an error
    random_init: bool = False
    #: hf: recompute each decoder layer's activations in the backward instead of keeping
    #: them (less memory for longer sequences, one more forward per layer; same masks)
    gradient_checkpointing: bool = False
    #: hf causal LMs: the cross-entropy a block of rows at a time in float32, keeping no
    #: float32 copy of the logits (``models/causal_lm_loss.py``); false: transformers' own
    #: loss. The same loss up to float rounding, less memory
    blockwise_loss: bool = True
    #: precision of the weights (and so of forward/backward): auto = the checkpoint's own
    #: (float32 for a model built without weights); the gradient statistic stays
    #: prune.stat_dtype (float32 by default; max_abs of 16-bit gradients is exact in their own
    #: dtype and kept there)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model.kind={self.kind!r}: choose one of {', '.join(MODEL_KINDS)}")
        if self.gradient_checkpointing and self.kind != "hf":
            raise ConfigError(f"model.gradient_checkpointing needs model.kind=hf (got {self.kind!r}): "
                              "set model.gradient_checkpointing=false")
        if self.kind == "hf" and not self.path:
            raise ConfigError("model.path is required when model.kind is 'hf' (a local model directory)")
        _check_model_options(self.kind, self.options)


def _check_model_options(kind: str, options: dict[str, Any]) -> None:
    """Built-in models: the options must build the model (checked without building it)."""
    from gradprobe_dist.models import SimpleMLP, TinyGPTConfig

    try:
        if kind == "tinygpt":
            TinyGPTConfig.from_dict(options)
        elif kind == "mlp":
            inspect.signature(SimpleMLP).bind(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.options {options} do not fit model.kind={kind!r}: {err}") from None


@dataclass
class DataConfig:
    #: directory of webdataset shards written by `gradprobe make-shards`
    shards: str = "runs/demo/calib"
    #: samples per rank per step; the global batch is micro_batch_size x world size
    micro_batch_size: int = 8
    #: evaluation: shards for `gradprobe eval` (perplexity or accuracy); optional
    eval_shards: str | None = None
    eval_batches: int = 8
    #: samples per evaluation micro-batch (default: micro_batch_size); no gradients are kept,
    #: so it can be larger, and under FSDP each one costs one all-gather of the weights
    eval_micro_batch_size: int | None = None

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ConfigError(f"data.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.eval_batches < 1:
            raise ConfigError(f"data.eval_batches={self.eval_batches} must be >= 1")
        if self.eval_micro_batch_size is not None and self.eval_micro_batch_size < 1:
            raise ConfigError(f"data.eval_micro_batch_size={self.eval_micro_batch_size} must be >= 1 "
                              "(or leave it out to use data.micro_batch_size)")

    @property
    def eval_batch_size(self) -> int:
        """Samples per evaluation micro-batch."""
        return self.eval_micro_batch_size or self.micro_batch_size


@dataclass
class PruneConfig:
    strategy: str = "magnitude"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.5
    num_batches: int = 8
    reduction_factor: float = 0.1
    gradient_threshold: float = 0.0
    #: thresholds for `gradprobe sweep`
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.5])
    statistic: str = "max_abs"
    stat_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: transformer blocks per stage (children of the model's block list); 0 = one stage
    stage_size: int = 0
    #: explicit stages, each a list of fnmatch patterns on parameter names (overrides stage_size)
    stages: list[list[str]] | None = None
    #: run the frozen blocks before a stage once per batch, not once per pass (same masks)
    cache_prefix: bool = True
    #: where that cached output waits between the passes: same (as the activations) or cpu
    prefix_cache_device: Literal["same", "cpu"] = "same"
    #: threshold: prune what the probe finds redundant (<= sparsity); target: exactly sparsity;
    #: sparsegpt: exactly sparsity, SparseGPT's mask and OBS update with the probe as a veto
    mode: Literal["threshold", "target", "sparsegpt"] = "threshold"
    #: target/sparsegpt mode: candidates probed = oversample x sparsity
    oversample: float = 1.5
    #: target and sparsegpt modes, which candidates the probe vetoes (ranked after every
    #: other candidate in the strategy's / SparseGPT's order): threshold (gradient ratio
    #: above 1 + gradient_threshold), fraction (veto_fraction of each layer's highest ratios),
    #: or none (target: the strategy's own masks, no probe, at most one forward pass per stage;
    #: sparsegpt: plain SparseGPT, no probe, one forward pass per stage, the strategy only
    #: supplies its N:M pattern)
    veto: Literal["threshold", "fraction", "none"] = "threshold"
    veto_fraction: float = 0.1
    #: per stage, also decide without the probe (the strategy's own masks, in threshold mode at
    #: the sparsity the probe reached; plain SparseGPT) and keep the probe's masks only when
    #: their calibration loss is lower by two standard errors (forward only)
    guard: bool = False
    #: guard: score on this many further calibration batches per rank, read after the probe's
    #: num_batches and never probed (0: the probe's own batches); unused without guard
    guard_batches: int = 0
    target_scope: Literal["layer", "global"] = "layer"
    #: how the sparsity is spread over layers (kind: uniform | owl | gradient)
    allocation: Allocation = field(default_factory=Allocation)
    #: update the kept weights of each Linear layer after its mask is decided (SparseGPT's OBS)
    reconstruct: bool = False
    #: save each layer's gradient ratios new/old in the checkpoint (for `gradprobe plot`)
    save_ratios: bool = True
    #: probe rounds reaching ``sparsity`` (1 = one-shot); each round re-probes every stage at
    #: the schedule's next sparsity, checkpointed in output_dir/round-NNN (see pipeline)
    rounds: int = 1
    #: how the rounds ramp up: cubic (Zhu & Gupta: fast first, slow near the end) or linear
    schedule: Literal["cubic", "linear"] = "cubic"

    def __post_init__(self):
        from gradprobe_dist.strategies import STRATEGIES, ScoredStrategy, build_strategy

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"prune.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.statistic not in STATISTICS:
            raise ConfigError(f"prune.statistic={self.statistic!r}: choose one of {', '.join(STATISTICS)}")
        if self.stage_size < 0:
            raise ConfigError(f"prune.stage_size={self.stage_size} must be >= 0 (0 = one stage)")
        if self.stages is not None and (not self.stages or not all(self.stages)):
            raise ConfigError(f"prune.stages={self.stages} has an empty stage: give each stage a "
                              "list of name patterns, e.g. [['blocks.0.*'], ['blocks.1.*']], or "
                              "remove prune.stages")
        if not self.thresholds:
            raise ConfigError("prune.thresholds is empty: list the thresholds `gradprobe sweep` "
                              "should try, e.g. [0.0, 0.1, 0.2]")
        try:
            check_prune_args(self.sparsity, self.num_batches, self.reduction_factor, self.gradient_threshold)
            for t in self.thresholds:
                check_threshold(t)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"prune.{err}") from None
        if self.oversample < 1:
            raise ConfigError(f"prune.oversample={self.oversample} must be >= 1")
        if self.allocation.kind == "gradient" and self.mode != "target":
            raise ConfigError("prune.allocation.kind=gradient needs prune.mode=target")
        self._check_sparsegpt()
        if not is_int(self.guard_batches) or self.guard_batches < 0:
            raise ConfigError(f"prune.guard_batches={self.guard_batches!r} counts the calibration batches "
                              "per rank the guard scores on: give an int >= 0 (0: the probe's own)")
        if self.guard and ((self.mode != "threshold" and self.veto == "none") or self.rounds != 1):
            raise ConfigError("prune.guard compares the probe's decision with the strategy's own masks: "
                              "it needs prune.rounds=1 and, in target or sparsegpt mode, prune.veto "
                              "threshold or fraction; set prune.guard=false otherwise")
        try:
            strategy = build_strategy(self.strategy, **self.strategy_options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"prune.strategy_options: {err}") from None
        if self.guard:
            try:
                check_guard(self.mode, strategy.get_name(), isinstance(strategy, ScoredStrategy),
                            getattr(strategy, "nm", None))
            except ValueError as err:
                raise ConfigError(f"prune.{err}") from None
        self._check_rounds(strategy)

    @property
    def fraction_vetoed(self) -> float | None:
        """``veto_fraction`` where ``veto: fraction`` reads it, else None (the library's
        ``veto_fraction`` argument)."""
        return self.veto_fraction if self.veto == "fraction" else None

    @property
    def held_out_batches(self) -> int:
        """Calibration batches per rank read after the probe's for the guard (0 without it)."""
        return self.guard_batches if self.guard else 0

    def _check_sparsegpt(self) -> None:
        if not 0.0 <= self.veto_fraction <= 1.0:
            raise ConfigError(f"prune.veto_fraction={self.veto_fraction} must be in [0, 1]")
        if self.mode != "sparsegpt":
            return
        unsupported = {"prune.reconstruct": self.reconstruct,
                       "prune.allocation.kind": self.allocation.kind != "uniform",
                       "prune.rounds": self.rounds != 1}
        for key, used in unsupported.items():
            if used:
                raise ConfigError(f"prune.mode=sparsegpt does not combine with {key} (SparseGPT "
                                  f"updates the kept weights itself, one shot, uniform sparsity): "
                                  f"leave {key} at its default")

    def _check_rounds(self, strategy) -> None:
        """Rounds ramp a per-layer count up over all weights: nothing else may fix the count."""
        if self.rounds < 1:
            raise ConfigError(f"prune.rounds={self.rounds} must be >= 1 (1 = one-shot pruning)")
        if self.rounds == 1:
            return
        if self.sparsity == 0:
            raise ConfigError(f"prune.rounds={self.rounds} needs prune.sparsity > 0 (the sparsity "
                              "the last round reaches)")
        unsupported = {"prune.allocation.kind": self.allocation.kind != "uniform",
                       "prune.reconstruct": self.reconstruct,
                       "prune.strategy_options.pattern": bool(getattr(strategy, "nm", None))}
        for key, used in unsupported.items():
            if used:
                raise ConfigError(f"prune.rounds={self.rounds} does not combine with {key}: "
                                  f"set prune.rounds=1, or leave {key} at its default")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    parallel: str = "none"
    #: fnmatch patterns of module names wrapped as FSDP2 units (default: each block)
    fsdp_units: list[str] | None = None
    #: where per-layer masks (and the manifest) are written
    output_dir: str = "runs/demo/masks"
    #: "auto" (cuda when available), "cpu" or "cuda"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"parallel={self.parallel!r}: choose one of {', '.join(PARALLEL_MODES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose auto, cpu or cuda")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: name the directory for the mask checkpoint")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")

    def mask_fields(self) -> dict[str, Any]:
        """The settings that change the masks, keyed by their config key: a resume must match
        them exactly, and a refusal names the key that differs (e.g. ``prune.sparsity``).
        ``prune.rounds``/``prune.schedule`` appear only with rounds > 1, so one-shot runs keep
        the config hash (and resume the checkpoints) they had before rounds existed."""
        p = self.prune
        fields = {f"prune.{name}": getattr(p, name) for name in (
            "strategy", "strategy_options", "sparsity", "num_batches", "reduction_factor",
            "gradient_threshold", "statistic", "stat_dtype", "stage_size", "stages", "mode",
            "oversample", "target_scope", "reconstruct")}
        fields["prune.allocation"] = dataclasses.asdict(p.allocation)
        if p.mode in ("sparsegpt", "target"):  # only then, so other runs keep their fingerprint
            fields.update({"prune.veto": p.veto, "prune.veto_fraction": p.veto_fraction})
        if p.guard:
            fields["prune.guard"] = True
        if p.held_out_batches:
            fields["prune.guard_batches"] = p.held_out_batches
        if p.rounds > 1:
            fields.update({"prune.rounds": p.rounds, "prune.schedule": p.schedule})
        return {"model": self._model_fields(), **fields, "data.shards": self.data.shards,
                "data.micro_batch_size": self.data.micro_batch_size, "seed": self.seed}

    def _model_fields(self) -> dict[str, Any]:
        """``model.*`` as the masks see it: random_init is implied by an empty path,
        gradient_checkpointing and blockwise_loss change memory, not masks (beyond float
        rounding), and an unset extra_prunable is left out so that checkpoints made before it
        existed resume."""
        fields = dataclasses.asdict(self.model)
        del fields["random_init"], fields["gradient_checkpointing"], fields["blockwise_loss"]
        if not fields["extra_prunable"]:
            del fields["extra_prunable"]
        if fields["dtype"] == "auto":  # the checkpoint's own, as before model.dtype existed
            del fields["dtype"]
        return fields


# -- loading -------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the --config path") from None
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"config file {path} cannot be read ({reason}); pass a readable "
                              "YAML file to --config") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(err)}; fix the "
                              "line it names") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. prune.sparsity=0.6")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(err)}); "
                              "quote it or fix the brackets, e.g. prune.stages=[[a*],[b*]]") from None
        _set_dotted(raw, key.strip(), parsed)
    return build(RunConfig, raw, "")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def build(cls, raw: Any, prefix: str):
    """Build dataclass ``cls`` from a dict, checking keys and types, naming the key on error."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' in {where}; valid keys: {', '.join(fields)}")
    values = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        if prefix and not str(err).startswith(prefix):
            raise ConfigError(f"{prefix}{err}") from None
        raise


def _convert(hint, value: Any, key: str):
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and is_int(value):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or
                                            (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
