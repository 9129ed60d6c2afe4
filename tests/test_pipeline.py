"""The staged pipeline in one process: stage plans, staging semantics, per-layer writes,
non-LM data, and the progress output. (Resume and kills: test_resume.py; the CLI: test_cli.py.)

``make_tiny_data`` and ``write_config`` are shared with test_cli.py and test_resume.py.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from gradprobe_dist import GradProbe, MagnitudePruning
from gradprobe_dist.pipeline import stages as stage_module
from gradprobe_dist.checkpoint.store import MaskCheckpoint, load_masks
from gradprobe_dist.pipeline.config import load_config
from gradprobe_dist.data.loader import shard_batches
from gradprobe_dist.data.shards import bundled_text_path, write_tensor_shards, write_text_shards
from gradprobe_dist.runtime.env import DistEnv
from gradprobe_dist.models import TinyGPT, TinyGPTConfig
from gradprobe_dist.pipeline.job import PruneJob
from gradprobe_dist.pipeline.stages import plan_stages

TINY_GPT = {"vocab_size": 256, "block_size": 16, "n_layer": 3, "n_head": 2, "n_embd": 16}
STAGE_LAYERS = [[f"blocks.{b}.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
                for b in range(3)]
ONE_PROCESS = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


# -- shared helpers ------------------------------------------------------------------------
def make_tiny_data(root: Path) -> dict[str, str]:
    """Byte-level Shakespeare windows of 16 tokens: 64 calibration samples in 8 shards (so 2
    ranks get 4 shards each) and 32 evaluation samples in 4 shards."""
    calib, valid = root / "calib", root / "valid"
    if not calib.exists():
        write_text_shards([bundled_text_path("train")], calib, seq_len=16, samples_per_shard=8, max_samples=64)
        write_text_shards([bundled_text_path("valid")], valid, seq_len=16, samples_per_shard=8, max_samples=32)
    return {"calib": str(calib), "valid": str(valid)}


def write_config(path: Path, shards: dict[str, str], *, output_dir: Path, **sections) -> Path:
    """A tiny TinyGPT run config (3 blocks, one block per stage); ``sections`` update the
    top-level keys, e.g. ``prune={"sparsity": 0.6}`` or ``parallel="fsdp"``."""
    config = {
        "model": {"kind": "tinygpt", "options": dict(TINY_GPT), "random_init": True},
        "data": {"shards": shards["calib"], "micro_batch_size": 2, "eval_shards": shards["valid"],
                 "eval_batches": 8},
        "prune": {"strategy": "magnitude", "sparsity": 0.5, "num_batches": 4, "stage_size": 1,
                  "thresholds": [0.0, 0.5, 2.0]},
        "parallel": "none", "output_dir": str(output_dir), "device": "cpu", "seed": 0,
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def job_for(config_path: Path, *overrides: str) -> PruneJob:
    return PruneJob(load_config(config_path, list(overrides)), ONE_PROCESS, show_progress=False)


# -- stage plans -----------------------------------------------------------------------------
def test_stage_size_groups_blocks_in_model_order():
    model = TinyGPT(TinyGPTConfig(**TINY_GPT))
    names = [n for stage in STAGE_LAYERS for n in stage]
    assert plan_stages(model, names, 1, None) == STAGE_LAYERS
    assert plan_stages(model, names, 2, None) == [STAGE_LAYERS[0] + STAGE_LAYERS[1], STAGE_LAYERS[2]]
    assert plan_stages(model, names, 0, None) == [names]


def test_explicit_stages_take_patterns_in_order_and_leave_the_rest_last():
    model = TinyGPT(TinyGPTConfig(**TINY_GPT))
    names = [n for stage in STAGE_LAYERS for n in stage]
    plan = plan_stages(model, names, 0, [["*.mlp.*"], ["blocks.0.*"]])
    assert plan[0] == [n for n in names if ".mlp." in n]
    assert plan[1] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"]
    assert plan[2] == ["blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight",
                       "blocks.2.attn.qkv.weight", "blocks.2.attn.proj.weight"]
    with pytest.raises(ValueError, match=r"prune\.stages\[1\].*matches no prunable parameter"):
        plan_stages(model, names, 0, [["blocks.*"], ["head.*"]])


def test_stage_size_without_a_block_list_names_the_alternative():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="use prune.stages with patterns"):
        plan_stages(model, ["0.weight", "1.weight"], 1, None)


# -- staging semantics -----------------------------------------------------------------------
def test_a_stage_probes_on_earlier_stages_pruned_and_matches_a_manual_two_step_run(tiny_data, tmp_path, monkeypatch):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks",
                          prune={"stages": [["blocks.0.*"], ["blocks.1.*"]]})
    seen = []  # stage-0 weights as the stage-1 probe found them

    class Spy(GradProbe):
        def probe(self, *args, **kwargs):
            params = dict(self.model.named_parameters())
            seen.append({n: params[n].detach().clone() for n in STAGE_LAYERS[0]})
            return super().probe(*args, **kwargs)

    monkeypatch.setattr(stage_module, "GradProbe", Spy)
    job = job_for(config)
    original = copy.deepcopy(job.model)
    job.run()
    masks = load_masks(tmp_path / "masks")
    assert len(seen) == 3  # stages blocks.0, blocks.1, and the rest (blocks.2)
    for name in STAGE_LAYERS[0]:
        assert masks[name].any()
        assert bool((seen[0][name] != 0).all()), "stage 1 probed an already-pruned weight"
        assert bool((seen[1][name][masks[name]] == 0).all()), "stage 2 did not see stage 1's zeros"

    # the same thing by hand: GradProbe on blocks.0, then GradProbe on blocks.1
    batches = shard_batches(tiny_data["calib"], micro_batch_size=2, num_batches=4)
    manual = copy.deepcopy(original)
    by_hand = {}
    for stage in STAGE_LAYERS[:2]:
        by_hand.update(GradProbe(manual, MagnitudePruning(), include=stage).prune(batches, None, 0.5, 4))
    for name in STAGE_LAYERS[0] + STAGE_LAYERS[1]:
        assert torch.equal(masks[name], by_hand[name].cpu()), name
    # and staging matters: blocks.1 probed on the unpruned network decides differently
    unstaged = GradProbe(copy.deepcopy(original), MagnitudePruning(), include=STAGE_LAYERS[1]).prune(
        batches, None, 0.5, 4)
    assert any(not torch.equal(masks[n], unstaged[n]) for n in STAGE_LAYERS[1])


def test_each_stage_is_on_disk_before_the_next_stage_probes(tiny_data, tmp_path, monkeypatch):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks")
    events = []

    class Spy(GradProbe):
        def probe(self, *args, **kwargs):
            on_disk = MaskCheckpoint.read(tmp_path / "masks").completed()
            events.append(("probe", self.param_names[0], tuple(on_disk)))
            return super().probe(*args, **kwargs)

    monkeypatch.setattr(stage_module, "GradProbe", Spy)
    result = job_for(config).run()
    assert [e[1] for e in events] == [stage[0] for stage in STAGE_LAYERS]
    for index, (_, _, on_disk) in enumerate(events):
        assert list(on_disk) == [n for stage in STAGE_LAYERS[:index] for n in stage]
    assert result.layers_written == [n for stage in STAGE_LAYERS for n in stage]
    manifest = MaskCheckpoint.read(tmp_path / "masks")
    assert [manifest.layer_info(n)["stage"] for n in result.layers_written] == [0] * 4 + [1] * 4 + [2] * 4


def test_final_sparsity_and_rows_describe_the_pruned_model(tiny_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks")
    job = job_for(config)
    result = job.run()
    params = dict(job.model.named_parameters())
    names = [n for stage in STAGE_LAYERS for n in stage]
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    assert result.sparsity == pytest.approx(zeros / sum(params[n].numel() for n in names))
    assert 0.1 < result.sparsity <= 0.5
    masks = load_masks(tmp_path / "masks")
    for row in result.rows:
        assert row["pruned"] == int(masks[row["name"]].sum()) == int((params[row["name"]] == 0).sum())
        assert row["tentative"] == int(0.5 * masks[row["name"]].numel())  # magnitude: exactly k per layer
        assert row["restored"] == row["tentative"] - row["pruned"]


def test_without_a_launcher_a_parallel_config_runs_in_one_process(tiny_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks", parallel="fsdp")
    assert job_for(config).backend.name == "none"
    launched = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ValueError, match="parallel: none runs in one process"):
        PruneJob(load_config(config, ["parallel=none"]), launched)


def test_evaluation_reads_no_calibration_data_and_needs_eval_shards(tiny_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks",
                          data={"shards": str(tmp_path / "absent")})
    assert job_for(config).evaluate()["tokens"] == 8 * 2 * 15  # eval_batches x micro batch x shifted tokens
    with pytest.raises(ValueError, match="set data.eval_shards"):
        job_for(config, "data.eval_shards=null").evaluate()


def test_evaluation_micro_batches_change_the_passes_not_the_result(tiny_data, tmp_path):
    """data.eval_micro_batch_size regroups the same samples: 4 forwards of 4 give the
    8 forwards of 2's tokens and loss (to float rounding), and calibration keeps its size."""
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks")
    small = job_for(config).evaluate()
    job = job_for(config, "data.eval_micro_batch_size=4", "data.eval_batches=4")
    calls = []
    job.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    large = job.evaluate()
    assert calls == [4, 4, 4, 4]
    assert large["tokens"] == small["tokens"] == 8 * 2 * 15
    assert large["loss"] == pytest.approx(small["loss"], rel=1e-6)
    assert [b["input_ids"].shape[0] for b in job.calibration] == [2] * len(job.calibration)


def test_classifier_on_tensor_shards_prunes_evaluates_and_sweeps(tmp_path):
    """(inputs, targets) data take the cross-entropy path, in prune, eval and sweep."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 12, generator=gen)
    targets = (inputs[:, :3].sum(1) > 0).long()
    write_tensor_shards(inputs, targets, tmp_path / "calib", samples_per_shard=16)
    config = tmp_path / "mlp.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"kind": "mlp", "options": {"input_dim": 12, "hidden_dims": [16, 16], "output_dim": 2}},
        "data": {"shards": str(tmp_path / "calib"), "micro_batch_size": 8, "eval_shards": str(tmp_path / "calib"),
                 "eval_batches": 8},
        "prune": {"sparsity": 0.5, "num_batches": 4, "stage_size": 1, "thresholds": [0.0, 1.0]},
        "output_dir": str(tmp_path / "masks"), "device": "cpu"}))
    job = job_for(config)
    result = job.run()
    assert result.layers_written == ["layers.0.weight", "layers.1.weight", "head.weight"]
    assert result.stages == 3  # one per block of `layers`, then the rest (the head)
    metrics = job.evaluate()
    assert metrics["samples"] == 64 and 0.0 <= metrics["accuracy"] <= 1.0
    sweep = job_for(config).sweep(show_progress=False)
    assert sweep["weights_pruned"][0] <= sweep["weights_pruned"][1]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in sweep["metrics"])


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_data, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks")
    PruneJob(load_config(config), ONE_PROCESS, show_progress=True).run()
    err = capsys.readouterr().err
    assert "stages:" not in err and "pass:" not in err and "\r" not in err
