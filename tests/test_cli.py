"""Every subcommand end to end on tiny data: in-process `cli.main([...])` as one process, and
real `torchrun --nproc_per_node=2 -m gradprobe_dist ...` jobs for two ranks.

Helpers live in cli_helpers.py; the ``log_lines`` fixture in conftest.py.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradprobe_dist import cli
from gradprobe_dist.checkpoint.store import MaskCheckpoint, load_masks

sys.path.insert(0, os.path.dirname(__file__))
from cli_helpers import run_json, run_two_ranks, succeeded  # noqa: E402
from test_pipeline import STAGE_LAYERS, make_tiny_data, write_config  # noqa: E402

LAYERS = [n for stage in STAGE_LAYERS for n in stage]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """TinyGPT trained briefly on the calibration text: pruning it changes its loss visibly."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "run.yaml", data, output_dir=root / "masks")
    weights = root / "model.safetensors"
    assert cli.main(["train", "--config", str(config), "--steps", "40", "--out", str(weights), "--quiet"]) == 0
    return weights


@pytest.fixture(scope="module")
def one_process_masks(data, trained, tmp_path_factory):
    """A mask checkpoint of the trained model written by one process (2-rank tests load it);
    a lenient threshold prunes enough to move the loss."""
    root = tmp_path_factory.mktemp("one")
    config = write_config(root / "run.yaml", data, output_dir=root / "masks", model={"path": str(trained)},
                          prune={"sparsity": 0.6, "gradient_threshold": 2.0})
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    return config, root / "masks"


# -- one process -----------------------------------------------------------------------------
def test_make_shards_writes_loadable_shards(tmp_path, capsys):
    result = run_json(capsys, "make-shards", "--bundled", "valid", "--out", tmp_path / "s",
                      "--seq-len", 8, "--samples-per-shard", 4, "--max-samples", 12)
    assert [Path(p).name for p in result["shards"]] == sorted(p.name for p in (tmp_path / "s").glob("*.tar"))
    assert len(result["shards"]) == 3
    assert json.loads((tmp_path / "s" / "metadata.json").read_text())["kind"] == "text"


def test_train_lowers_the_loss_and_saves_loadable_weights(data, trained, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    untrained = run_json(capsys, "eval", "--config", config, "--quiet")
    learnt = run_json(capsys, "eval", "--config", config, f"model.path={trained}", "--quiet")
    assert learnt["loss"] < untrained["loss"] - 1.0  # ln(256) = 5.55 for the untrained model
    result = run_json(capsys, "train", "--config", config, "--steps", 3, "--out", tmp_path / "m.safetensors")
    assert result["steps"] == 3 and result["out"] == str(tmp_path / "m.safetensors")
    assert set(load_file(tmp_path / "m.safetensors")) >= set(LAYERS)


def test_validate_prints_the_config_and_stage_plan(data, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    assert cli.main(["validate", "--config", str(config), "prune.stage_size=2"]) == 0
    out = capsys.readouterr().out
    assert "stage_size: 2" in out and "# config OK" in out
    assert "# stage 1/2: 8 layers (blocks.0.attn.qkv.weight ... blocks.1.mlp.proj.weight)" in out
    assert not (tmp_path / "masks").exists()  # nothing ran
    result = run_json(capsys, "validate", "--config", config)
    assert result["stages"] == STAGE_LAYERS


def test_validate_rejects_a_bad_config_naming_the_key(data, tmp_path, capsys, log_lines):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    assert cli.main(["validate", "--config", str(config), "prune.sparsity=2"]) == 2
    assert any(line.startswith("ERROR prune.sparsity=2.0 is outside [0, 1)") for line in log_lines)
    assert cli.main(["validate", "--config", str(config), "prune.stages=[[nothing*]]"]) == 2
    assert any("prune.stages[0] = ['nothing*'] matches no prunable parameter" in line for line in log_lines)
    assert capsys.readouterr().out == ""


def test_prune_json_inspect_and_quiet(data, tmp_path, capsys, log_lines):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    result = run_json(capsys, "prune", "--config", config, "--eval")
    assert result["layers_written"] == LAYERS and result["stages"] == 3 and result["world_size"] == 1
    assert result["eval_after"]["loss"] != result["eval_before"]["loss"]
    assert any(line.startswith("INFO stage 2/3: blocks.1.attn.qkv.weight 48x16 pruned") for line in log_lines)
    rows = run_json(capsys, "inspect", tmp_path / "masks")
    assert rows == result["layers"] == MaskCheckpoint.read(tmp_path / "masks").summary_rows()
    assert cli.main(["inspect", str(tmp_path / "masks")]) == 0
    table = capsys.readouterr().out
    assert "blocks.2.mlp.proj.weight" in table and "16x64" in table and "12 layers" in table

    after_only = run_json(capsys, "prune", "--config", config, "--restart", "--eval-after")
    assert after_only["eval_before"] is None and after_only["eval_after"] == result["eval_after"]

    log_lines.clear()
    assert cli.main(["prune", "--config", str(config), "--restart", "--quiet"]) == 0
    assert not [line for line in log_lines if line.startswith("INFO")]
    assert "sparsity over prunable weights" in capsys.readouterr().out
    assert logging.getLogger("gradprobe_dist").level == logging.INFO  # --quiet does not leak


def test_sweep_prunes_more_as_the_threshold_grows_and_leaves_the_model_unchanged(data, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    result = run_json(capsys, "sweep", "--config", config, "--out", tmp_path / "sweep.json", "--quiet")
    assert result["thresholds"] == [0.0, 0.5, 2.0]
    assert result["weights_pruned"] == sorted(result["weights_pruned"])
    assert result["weights_pruned"][-1] > result["weights_pruned"][0]
    assert json.loads((tmp_path / "sweep.json").read_text()) == result
    assert not (tmp_path / "masks").exists()


def test_eval_with_masks_equals_eval_of_the_exported_model(one_process_masks, tmp_path, capsys):
    config, masks_dir = one_process_masks
    masked = run_json(capsys, "eval", "--config", config, "--masks", masks_dir, "--quiet")
    plain = run_json(capsys, "eval", "--config", config, "--quiet")
    assert masked["loss"] > plain["loss"] + 1e-3 and masked["tokens"] == plain["tokens"] == 8 * 2 * 15
    out = tmp_path / "pruned.safetensors"
    assert run_json(capsys, "export", "--config", config, "--masks", masks_dir, "--out", out)["masked"] == 12
    weights, masks = load_file(out), load_masks(masks_dir)
    for name, mask in masks.items():
        assert torch.equal(weights[name] == 0, mask), name
    exported = run_json(capsys, "eval", "--config", config, f"model.path={out}", "--quiet")
    assert exported == masked


def test_export_as_torch_prune_buffers(one_process_masks, tmp_path, capsys):
    config, masks_dir = one_process_masks
    out = tmp_path / "pruned.pt"
    run_json(capsys, "export", "--config", config, "--masks", masks_dir, "--out", out, "--torch-prune")
    state = torch.load(out, weights_only=True)
    for name, mask in load_masks(masks_dir).items():
        prefix = name.removesuffix("weight")
        assert torch.equal(state[prefix + "weight_mask"], (~mask).float()), name
        assert torch.equal(state[prefix + "weight_orig"] == 0, mask), name  # kept weights intact


def test_eval_refuses_masks_of_another_model(one_process_masks, capsys, log_lines):
    config, masks_dir = one_process_masks
    assert cli.main(["eval", "--config", str(config), "--masks", str(masks_dir), "model.path=",
                     "model.options={n_embd: 32, n_head: 2, n_layer: 3, block_size: 16}"]) == 2
    assert any("layer 'blocks.0.attn.qkv.weight' of the mask checkpoint" in line and
               "has shape [48, 16] but the configured model's weight has shape [96, 32]" in line
               for line in log_lines)


# -- two ranks (real torchrun) ---------------------------------------------------------------
def test_two_rank_make_shards_and_inspect(tmp_path, one_process_masks):
    result = succeeded(run_two_ranks("make-shards", "--bundled", "valid", "--out", tmp_path / "s",
                                     "--seq-len", 8, "--samples-per-shard", 4, "--max-samples", 8))
    assert result.stdout.count("wrote 2 shards") == 1
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == ["calib-000000.tar", "calib-000001.tar"]
    result = succeeded(run_two_ranks("inspect", one_process_masks[1], "--json"))
    assert json.loads(result.stdout) == MaskCheckpoint.read(one_process_masks[1]).summary_rows()


def test_two_rank_train(data, tmp_path):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    result = succeeded(run_two_ranks("train", "--config", config, "--steps", 5, "--out", tmp_path / "m.safetensors"))
    assert result.stdout.count("trained 5 steps") == 1
    assert set(load_file(tmp_path / "m.safetensors")) >= set(LAYERS)


def test_two_rank_ddp_prune_with_eval(data, tmp_path):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks", parallel="ddp")
    result = succeeded(run_two_ranks("prune", "--config", config, "--eval", "--json"))
    summary = json.loads(result.stdout)  # stdout is rank 0's JSON only
    assert summary["world_size"] == 2 and summary["layers_written"] == LAYERS
    assert summary["eval_before"]["tokens"] == 2 * 8 * 2 * 15  # both ranks' eval batches
    assert summary["layers"] == MaskCheckpoint.read(tmp_path / "masks").summary_rows()
    ours = [line for line in result.stderr.splitlines() if " INFO " in line or " ERROR " in line]
    assert ours and all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in ours)
    progress = [line for line in ours if "stage " in line]
    assert len(progress) == 3 + 12 and all(line.startswith("[rank 0] ") for line in progress)


def test_two_rank_fsdp_sweep(data, tmp_path):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks", parallel="fsdp")
    result = succeeded(run_two_ranks("sweep", "--config", config, "--out", tmp_path / "sweep.json"))
    assert "threshold  sparsity" in result.stdout and result.stdout.count("threshold  sparsity") == 1
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["weights_pruned"] == sorted(sweep["weights_pruned"]) and sweep["weights_pruned"][0] > 0


def test_two_ranks_eval_and_export_a_one_process_checkpoint(one_process_masks, tmp_path, capsys):
    """Masks written by one process, applied on 2 FSDP ranks: same metrics over the same samples
    (each rank reads half of the 32 evaluation samples), same exported weights."""
    config, masks_dir = one_process_masks
    one = run_json(capsys, "eval", "--config", config, "--masks", masks_dir, "data.eval_batches=16", "--quiet")
    plain = run_json(capsys, "eval", "--config", config, "data.eval_batches=16", "--quiet")
    result = succeeded(run_two_ranks("eval", "--config", config, "--masks", masks_dir, "parallel=fsdp",
                                     "data.eval_batches=8", "--json"))
    two = json.loads(result.stdout)
    assert two["tokens"] == one["tokens"] == 32 * 15
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["loss"] > plain["loss"] + 1e-3  # the masks made a difference, and 2 ranks matched it

    run_json(capsys, "export", "--config", config, "--masks", masks_dir, "--out", tmp_path / "one.safetensors")
    succeeded(run_two_ranks("export", "--config", config, "--masks", masks_dir, "parallel=fsdp",
                            "--out", tmp_path / "two.safetensors"))
    one_w, two_w = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one_w.keys() == two_w.keys() and all(torch.equal(one_w[k], two_w[k]) for k in one_w)


def test_package_main_runs_the_cli_only_as_the_main_module(monkeypatch):
    """A spawned worker (fetch-model converts the tokenizer in one) imports the parent's
    ``__main__`` module as ``__mp_main__``: that import must not start a second CLI run."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["gradprobe", "--help"])
    runpy.run_module("gradprobe_dist.__main__", run_name="__mp_main__")  # returns: no CLI
    with pytest.raises(SystemExit) as done:
        runpy.run_module("gradprobe_dist.__main__", run_name="__main__")
    assert done.value.code == 0  # --help ran
