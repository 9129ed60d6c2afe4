"""Which parameters are prunable: include/exclude only narrow the default candidates (Linear
and Conv weights); other parameters need an explicit extra_prunable."""
from __future__ import annotations

import os
import sys

import pytest
import torch.nn as nn

from gradprobe_dist.checkpoint.store import MaskCheckpoint
from gradprobe_dist.models import TinyGPT, TinyGPTConfig
from gradprobe_dist.probe.params import find_prunable

sys.path.insert(0, os.path.dirname(__file__))
from test_pipeline import STAGE_LAYERS, job_for, make_tiny_data, write_config  # noqa: E402

LINEAR_WEIGHTS = [n for stage in STAGE_LAYERS for n in stage]  # the 3-block TinyGPT's


def tiny_gpt() -> TinyGPT:
    return TinyGPT(TinyGPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8))


def test_include_blocks_keeps_norms_and_biases_unprunable():
    model = tiny_gpt()
    owners = find_prunable(model, include=["blocks.*"])
    inside = [n for n, _ in model.named_parameters() if n.startswith("blocks.")]
    assert any(n.endswith(".bias") for n in inside) and any(".ln_" in n for n in inside)  # the trap exists
    assert list(owners) == [n for n in inside if n.endswith("weight") and ".ln_" not in n]
    assert all(isinstance(m, nn.Linear) for m in owners.values())
    assert list(owners) == list(find_prunable(model))  # every default candidate sits in a block


def test_include_and_exclude_narrow_the_default_candidates():
    model = tiny_gpt()
    assert list(find_prunable(model, include=["blocks.1.*"], exclude=["*.attn.*"])) == [
        "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight"]
    with pytest.raises(ValueError, match="no prunable parameters.*extra_prunable="):
        find_prunable(model, include=["*.ln_1.weight"])  # a norm weight is not a candidate


def test_extra_prunable_adds_parameters_explicitly_and_include_still_filters():
    model = tiny_gpt()
    names = list(find_prunable(model, extra_prunable=["*.ln_1.weight"]))
    assert names == [n for n, _ in model.named_parameters()
                     if n in find_prunable(model) or n.endswith("ln_1.weight")]  # model order
    assert list(find_prunable(model, include=["blocks.0.*"], extra_prunable=["*.ln_1.weight"])) == [
        "blocks.0.ln_1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def test_config_include_blocks_prunes_only_linear_weights(data, tmp_path):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")
    assert job_for(config, "model.include=['blocks.*']").names == LINEAR_WEIGHTS


def test_config_extra_prunable_reaches_the_checkpoint(data, tmp_path):
    config = write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks",
                          model={"extra_prunable": ["blocks.0.ln_1.weight"]})
    job = job_for(config, "prune.stage_size=0")
    assert job.names == ["blocks.0.ln_1.weight", *LINEAR_WEIGHTS]
    with job:
        job.run()
    assert MaskCheckpoint.read(tmp_path / "masks").completed() == job.names
