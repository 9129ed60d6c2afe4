"""SparseGPT in the staged pipeline: prune.mode=sparsegpt with veto none (plain SparseGPT,
block after block) or a probe veto; the updated weights reach the checkpoint, resume and export."""
from __future__ import annotations

import copy

import pytest
import torch

from gradprobe_dist import SparseGPT
from gradprobe_dist.checkpoint import MaskCheckpoint, apply_masks, load_masks
from gradprobe_dist.data.loader import shard_batches
from gradprobe_dist.pipeline.config import ConfigError, load_config
from gradprobe_dist.pipeline.job import UPDATED_WEIGHT_KEY, apply_saved_weights
from gradprobe_dist.strategies.base import count_to_select
from test_pipeline import STAGE_LAYERS, job_for, make_tiny_data, write_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_plain_sparsegpt_runs_block_after_block_and_exports_its_updated_weights(tiny_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks",
                          prune={"mode": "sparsegpt", "veto": "none"})
    job = job_for(config)
    original = copy.deepcopy(job.model)
    job.run()
    pruned = _weights(job.model)
    masks = load_masks(tmp_path / "masks")

    # by hand: SparseGPT on blocks.0, then on blocks.1 through the pruned blocks.0, ...
    batches = shard_batches(tiny_data["calib"], micro_batch_size=2, num_batches=4)
    manual = copy.deepcopy(original)
    for stage in STAGE_LAYERS:
        by_hand = SparseGPT(manual, include=stage).prune(batches, 0.5, 4)
        for name in stage:
            assert torch.equal(masks[name], by_hand[name]), name
            assert int(masks[name].sum()) == count_to_select(masks[name].numel(), 0.5)
    for name, weight in _weights(manual).items():
        assert torch.equal(pruned[name], weight), name

    ckpt = MaskCheckpoint.read(tmp_path / "masks")
    assert all(UPDATED_WEIGHT_KEY in ckpt.layer_info(n)["tensors"] for n in masks)
    exported = copy.deepcopy(original)  # what `gradprobe export` does to the configured model
    apply_masks(exported, masks)
    assert sorted(apply_saved_weights(exported, ckpt)) == sorted(masks)
    for name, weight in _weights(exported).items():
        assert torch.equal(weight, pruned[name]), name
    dense = _weights(original)
    assert any(not torch.equal(pruned[n][~masks[n]], dense[n][~masks[n]]) for n in masks)  # updated


def test_probe_veto_mode_reaches_the_sparsity_and_a_resume_restores_the_weights(tiny_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks",
                          prune={"strategy": "wanda", "mode": "sparsegpt", "veto": "fraction",
                                 "veto_fraction": 0.2})
    job = job_for(config)
    original = copy.deepcopy(job.model)
    job.run()
    pruned = _weights(job.model)
    rows = {r["name"]: r for r in MaskCheckpoint.read(tmp_path / "masks").summary_rows()}
    for name, mask in load_masks(tmp_path / "masks").items():
        assert int(mask.sum()) == count_to_select(mask.numel(), 0.5)
        assert 0 <= rows[name]["restored"] <= rows[name]["tentative"]

    again = job_for(config)  # every stage on disk: applied, not recomputed
    again.model.load_state_dict(original.state_dict())
    result = again.run()
    assert result.stages_resumed == len(STAGE_LAYERS) and not result.layers_written
    for name, weight in _weights(again.model).items():
        assert torch.equal(weight, pruned[name]), name


@pytest.mark.parametrize("override,key", [
    ("prune.reconstruct=true", "prune.reconstruct"),
    ("prune.rounds=3", "prune.rounds"),
    ("prune.allocation.kind=owl", "prune.allocation.kind"),
    ("prune.veto_fraction=1.5", "prune.veto_fraction"),
])
def test_sparsegpt_mode_refuses_what_it_cannot_combine_with(tiny_data, tmp_path, override, key):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks",
                          prune={"mode": "sparsegpt"})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(config, [override])
