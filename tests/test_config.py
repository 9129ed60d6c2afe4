"""Run configs: YAML onto typed dataclasses, key=value overrides, errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gradprobe_dist.checkpoint import config_hash
from gradprobe_dist.pipeline.config import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert set(yaml.safe_load(path.read_text())) <= set(vars(cfg))


def test_yaml_maps_onto_typed_fields(tmp_path):
    cfg = load_config(write(tmp_path, {"prune": {"sparsity": 1 / 4, "num_batches": 3, "thresholds": [0, 1]},
                                       "model": {"options": {"n_layer": 2}}}))
    assert cfg.prune.sparsity == 0.25 and cfg.prune.num_batches == 3
    assert cfg.prune.thresholds == [0.0, 1.0] and all(type(t) is float for t in cfg.prune.thresholds)
    assert cfg.model.options == {"n_layer": 2}
    assert cfg.data.micro_batch_size == 8  # untouched keys keep their defaults


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, {"prune": {"sparsity": 0.5}}), [
        "prune.sparsity=0.7", "parallel=fsdp", "prune.stages=[['blocks.0.*'], ['blocks.1.*']]",
        "model.options={n_layer: 2}", "model.path=", "data.eval_batches=3"])
    assert cfg.prune.sparsity == 0.7 and cfg.parallel == "fsdp"
    assert cfg.prune.stages == [["blocks.0.*"], ["blocks.1.*"]]
    assert cfg.model.options == {"n_layer": 2} and cfg.model.path is None
    assert cfg.data.eval_batches == 3


@pytest.mark.parametrize("raw, overrides, key", [
    ({"prune": {"sparsityy": 0.5}}, [], "prune.sparsityy"),
    ({"modle": {}}, [], "modle"),
    ({}, ["data.shard=x"], "data.shard"),
    ({}, ["model.options.n_layer.x=1"], "model.options"),
])
def test_unknown_keys_are_errors_naming_the_key(tmp_path, raw, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'|{key}") as err:
        load_config(write(tmp_path, raw), overrides)
    assert key.split(".")[0] in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("prune.num_batches='8'", "prune.num_batches must be int"),
    ("prune.num_batches=8.5", "prune.num_batches must be int"),
    ("prune.sparsity=true", "prune.sparsity must be float"),
    ("seed=yes", "seed must be int"),
    ("output_dir=5", "output_dir must be str"),
    ("model.options=[1]", "model.options must be a mapping"),
    ("prune.stages=[a, b]", r"prune.stages\[0\] must be a list"),
    ("prune.thresholds=0.1", "prune.thresholds must be a list"),
    ("data=3", "data must be a mapping"),
])
def test_wrong_types_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("prune.sparsity=1.5", r"prune.sparsity=1.5 is outside \[0, 1\)"),
    ("prune.num_batches=0", "prune.num_batches=0 must be >= 1"),
    ("prune.reduction_factor=0", r"prune.reduction_factor=0.0 is outside \(0, 1\)"),
    ("prune.gradient_threshold=-0.1", "prune.gradient_threshold=-0.1 is negative"),
    ("prune.thresholds=[0.1, -1]", "prune.gradient_threshold=-1.0 is negative"),
    ("prune.thresholds=[]", "prune.thresholds is empty"),
    ("prune.stage_size=-1", "prune.stage_size=-1 must be >= 0"),
    ("prune.stages=[[]]", "prune.stages=.* has an empty stage"),
    ("data.micro_batch_size=0", "data.micro_batch_size=0 must be >= 1"),
    ("data.eval_batches=0", "data.eval_batches=0 must be >= 1"),
    ("data.eval_micro_batch_size=0", "data.eval_micro_batch_size=0 must be >= 1"),
    ("seed=-1", "seed=-1 must be >= 0"),
    ("output_dir=''", "output_dir is empty"),
])
def test_out_of_range_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("parallel=mpi", "parallel='mpi': choose one of none, ddp, fsdp, zero3"),
    ("device=tpu", "device='tpu': choose auto, cpu or cuda"),
    ("model.kind=resnet", "model.kind='resnet': choose one of"),
    ("model.kind=hf", "model.path is required when model.kind is 'hf'"),
    ("prune.strategy=sparsegpt", "prune.strategy='sparsegpt': choose one of magnitude, wanda, random"),
    ("prune.statistic=median", "prune.statistic='median': choose one of"),
    ("prune.stat_dtype=float8", "prune.stat_dtype='float8': choose one of float32, bfloat16, float16"),
    ("prune.strategy_options={bogus: 1}", "prune.strategy_options: bad options {'bogus': 1} for strategy 'magnitude'"),
    ("model.options={n_embd: 30, n_head: 4}", "model.options .* do not fit model.kind='tinygpt'.*divisible"),
    ("model.options={depth: 3}", "model.options .* do not fit model.kind='tinygpt'.*unknown TinyGPTConfig keys"),
])
def test_bad_choices_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_mlp_options_are_checked_against_its_constructor():
    assert load_config(None, ["model.kind=mlp", "model.options={input_dim: 4, hidden_dims: [3]}"]).model.kind == "mlp"
    with pytest.raises(ConfigError, match="model.options .* do not fit model.kind='mlp'.*hidden"):
        load_config(None, ["model.kind=mlp", "model.options={hidden: [3]}"])


@pytest.mark.parametrize("bad, message", [
    ("prune.sparsity", "must look like key=value"),
    ("=3", "must look like key=value"),
    ("seed.x=1", "override seed.x: seed is not a section"),
])
def test_malformed_overrides_are_errors(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {"seed": 0}), [bad])


def test_unreadable_config_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("prune: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_mask_fields_name_config_keys_and_only_mask_changing_settings_change_the_fingerprint():
    base = load_config(None)
    assert {"prune.sparsity", "prune.strategy", "data.shards", "data.micro_batch_size", "seed",
            "model"} <= set(base.mask_fields())
    for same in (["parallel=fsdp"], ["output_dir=elsewhere"], ["data.eval_batches=2"], ["device=cpu"],
                 ["prune.thresholds=[0.3]"], ["model.blockwise_loss=false"]):
        assert config_hash(load_config(None, same).mask_fields()) == config_hash(base.mask_fields()), same
    for changed in (["prune.sparsity=0.6"], ["prune.stage_size=2"], ["model.options={n_layer: 2}"],
                    ["data.micro_batch_size=4"], ["seed=1"], ["prune.strategy=wanda"]):
        assert config_hash(load_config(None, changed).mask_fields()) != config_hash(base.mask_fields()), changed
