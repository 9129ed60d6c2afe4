"""Target mode with no veto selects with the strategy alone (``GradProbe.prune_by_strategy``;
the pipeline's ``strategy_alone`` stages): the masks and weights of the probe path, bit for
bit, with no backward at all (every call of ``torch.autograd.backward`` is counted) and at
most one forward pass, in one process and on 2 real gloo ranks under DDP, FSDP2 and ZeRO-3;
the checkpoint says every pruned weight was a candidate none of which was restored, and a
checkpoint the probe path started resumes with the same masks."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import Allocation, GradProbe
from gradprobe_dist.checkpoint.store import MaskCheckpoint, load_masks
from gradprobe_dist.pipeline import stages as stage_module
from gradprobe_dist.pipeline.config import load_config
from gradprobe_dist.pipeline.job import PruneJob
from gradprobe_dist.runtime.env import DistEnv
from multiproc import run_ranks
from test_pipeline import STAGE_LAYERS, job_for, make_tiny_data, write_config
from test_pipeline_iterative import forget_layers
from test_target_veto import LOSS, STRATEGIES, _data, _model

NUM_BATCHES = 4  # write_config's prune.num_batches


@contextmanager
def counted_backwards():
    """Counts every backward pass, whoever starts it (``Tensor.backward`` calls this too)."""
    calls = [0]
    original = torch.autograd.backward

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    torch.autograd.backward = counting
    try:
        yield calls
    finally:
        torch.autograd.backward = original


def _forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


# -- the library, one process ----------------------------------------------------------------
CASES = [(cls, options, {}) for cls, options in STRATEGIES] + [
    (STRATEGIES[3][0], {}, {"allocation": Allocation("owl", outlier_factor=2.0)}),
    (STRATEGIES[0][0], {}, {"allocation": Allocation("owl", outlier_factor=2.0)}),
    (STRATEGIES[3][0], {}, {"reconstruct": True}),
]


@pytest.mark.parametrize("cls, options, extra", CASES)
def test_prune_by_strategy_is_target_mode_unvetoed_without_a_backward(cls, options, extra):
    probed, alone = _model(), _model()
    want = GradProbe(probed, cls(**options)).prune(_data(), LOSS, 0.5, 4, mode="target",
                                                   veto_fraction=0.0, **extra)
    forwards = _forwards(alone)
    with counted_backwards() as backwards:
        probe = GradProbe(alone, cls(**options))
        got = probe.prune_by_strategy(_data(), LOSS, 0.5, 4, **extra)
    assert backwards[0] == 0
    needs_inputs = cls(**options).needs_activations or bool(extra)
    assert forwards[0] == (len(_data()) if needs_inputs else 0)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for (name, p), q in zip(probed.named_parameters(), alone.parameters()):
        assert torch.equal(p, q), name  # zeros, and the reconstructed kept weights, alike
    if "allocation" in extra:
        assert probe.layer_sparsity is not None and len(set(probe.layer_sparsity.values())) > 1


def test_the_control_backward_counter_sees_the_probe():
    with counted_backwards() as backwards:
        GradProbe(_model(), STRATEGIES[3][0]()).prune(_data(), LOSS, 0.5, 4, mode="target", veto_fraction=0.0)
    assert backwards[0] == 2 * len(_data())


def test_prune_by_strategy_refuses_the_gradient_allocation():
    with pytest.raises(ValueError, match="gradient ratios: use prune"):
        GradProbe(_model(), STRATEGIES[0][0]()).prune_by_strategy(_data(), LOSS, 0.5, 4,
                                                                  allocation=Allocation("gradient"))


@pytest.mark.parametrize("cls", [STRATEGIES[0][0], STRATEGIES[3][0]])
def test_a_nan_weight_is_named_and_nothing_is_pruned(cls):
    model = _model()
    with torch.no_grad():
        model.layers[1].weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="parameter 'layers.1.weight' holds NaN/inf"):
        GradProbe(model, cls()).prune_by_strategy(_data(), LOSS, 0.5, 4)
    for name, p in model.named_parameters():
        assert torch.equal(p.nan_to_num(7.0), before[name].nan_to_num(7.0)), name  # nothing zeroed


# -- the pipeline, one process -------------------------------------------------------------------
PIPELINE_CASES = {
    "wanda": {"strategy": "wanda"},
    "wanda_2of4": {"strategy": "wanda", "strategy_options": {"pattern": "2:4"}},
    "magnitude_global": {"strategy": "magnitude", "strategy_options": {"scope": "global"}},
    "random": {"strategy": "random"},
    "wanda_owl": {"strategy": "wanda", "allocation": {"kind": "owl", "outlier_factor": 2.0}},
    "wanda_reconstruct": {"strategy": "wanda", "reconstruct": True},
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def _run(config, probed: bool, monkeypatch) -> tuple[PruneJob, int]:
    """One job; ``probed`` forces the probe path this test compares against."""
    with monkeypatch.context() as patch:
        if probed:
            patch.setattr(stage_module, "strategy_alone", lambda cfg, strategy, round_: False)
        job = job_for(config)
        with counted_backwards() as backwards:
            job.run()
    return job, backwards[0]


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_target_without_veto_equals_the_probe_path_with_no_backward(case, tiny_data, tmp_path,
                                                                             monkeypatch):
    prune = {"mode": "target", "veto": "none", "sparsity": 0.5, **PIPELINE_CASES[case]}
    runs = {}
    for probed in (True, False):
        out = tmp_path / ("probed" if probed else "alone")
        config = write_config(tmp_path / f"{out.name}.yaml", tiny_data, output_dir=out, prune=prune)
        runs[probed] = _run(config, probed, monkeypatch)
    (probed_job, probed_backwards), (alone_job, alone_backwards) = runs[True], runs[False]
    assert probed_backwards == 2 * NUM_BATCHES * len(STAGE_LAYERS)  # the counter sees the probe
    assert alone_backwards == 0
    want, got = load_masks(tmp_path / "probed"), load_masks(tmp_path / "alone")
    assert set(got) == set(want) == {n for stage in STAGE_LAYERS for n in stage}
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for (name, p), q in zip(probed_job.model.named_parameters(), alone_job.model.parameters()):
        assert torch.equal(p, q), name
    rows = {r["name"]: r for r in MaskCheckpoint.read(tmp_path / "alone").summary_rows()}
    probed_rows = {r["name"]: r for r in MaskCheckpoint.read(tmp_path / "probed").summary_rows()}
    for name, row in rows.items():
        assert row["pruned"] == probed_rows[name]["pruned"] == int(got[name].sum())
        assert row["tentative"] == row["pruned"] and row["restored"] == 0
        assert probed_rows[name]["tentative"] > probed_rows[name]["pruned"]  # oversampled candidates


def test_a_checkpoint_the_probe_path_started_resumes_without_probing(tiny_data, tmp_path, monkeypatch, log_lines):
    config = write_config(tmp_path / "run.yaml", tiny_data, output_dir=tmp_path / "masks",
                          prune={"mode": "target", "veto": "none", "strategy": "wanda"})
    _run(config, True, monkeypatch)
    full = load_masks(tmp_path / "masks")
    forget_layers(tmp_path / "masks", STAGE_LAYERS[1][2:] + STAGE_LAYERS[2])
    job = job_for(config)
    with counted_backwards() as backwards:
        result = job.run()
    assert backwards[0] == 0
    assert result.stages_resumed == 1
    assert result.layers_written == STAGE_LAYERS[1][2:] + STAGE_LAYERS[2]
    assert not any("differ from its checkpoint" in line for line in log_lines)
    again = load_masks(tmp_path / "masks")
    for name, mask in full.items():
        assert torch.equal(again[name], mask), name


# -- the pipeline, two gloo ranks ------------------------------------------------------------
DISTRIBUTED_CASES = {"wanda": PIPELINE_CASES["wanda"], "magnitude_global": PIPELINE_CASES["magnitude_global"]}


def _on_ranks(rank: int, world: int, mode: str, configs: dict[str, str]) -> dict:
    """Each case through the probe path and the strategy-alone path on this rank."""
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    out = {}
    original = stage_module.strategy_alone
    for key, config in configs.items():
        stage_module.strategy_alone = (lambda cfg, strategy, round_: False) if key.endswith("probed") else original
        try:
            with PruneJob(load_config(config, [f"parallel={mode}"]), env, show_progress=False) as job:
                with counted_backwards() as backwards:
                    job.run()
        finally:
            stage_module.strategy_alone = original
        out[key] = backwards[0]
    return out


@pytest.mark.parametrize("mode", ["fsdp", "ddp", "zero3"])
def test_two_ranks_give_the_probe_paths_masks_with_no_backward(mode, tiny_data, tmp_path):
    configs = {}
    for case, options in DISTRIBUTED_CASES.items():
        for path in ("probed", "alone"):
            key = f"{case}/{path}"
            configs[key] = str(write_config(tmp_path / f"{case}-{path}.yaml", tiny_data,
                                            output_dir=tmp_path / case / path,
                                            prune={"mode": "target", "veto": "none", **options}))
    backwards = run_ranks(_on_ranks, 2, mode, configs, timeout=400, env={"DS_ACCELERATOR": "cpu"})
    for rank_backwards in backwards:
        for key, count in rank_backwards.items():
            assert count == (2 * NUM_BATCHES * len(STAGE_LAYERS) if key.endswith("probed") else 0), key
    for case in DISTRIBUTED_CASES:
        want, got = load_masks(tmp_path / case / "probed"), load_masks(tmp_path / case / "alone")
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"{mode}/{case}: {name}"
