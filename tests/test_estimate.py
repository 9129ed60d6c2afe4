"""Loss-change estimates from the probe's two passes (probe/estimate.py): exact on a loss that
is quadratic in the weights, the veto they rank, the same on 2 FSDP2 ranks as in one
process, the pipeline's ``prune.veto: loss_change``, and the errors."""
import copy

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP, WandaPruning
from gradprobe_dist.parallel import build_backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe.estimate import pass_loss_check, path_estimate, removal_estimate
from gradprobe_dist.probe.veto import probe_vetoes
from gradprobe_dist.strategies.base import count_to_select
from multiproc import run_ranks

MSE = nn.MSELoss()
LOSS = nn.CrossEntropyLoss()


def _regression(n=4, b=16):
    """A loss quadratic in the weights: least squares through one bias-free Linear layer."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 12, generator=g), torch.randn(b, 5, generator=g)) for _ in range(n)]


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 5, bias=False))


def _mean_loss(model, batches, loss_fn) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)


@pytest.mark.parametrize("r", [0.1, 0.5])
def test_on_a_quadratic_loss_both_estimates_are_exact(r):
    """Summed over the candidates: the path estimate is the measured change between the two
    passes, and the removal estimate is the loss change of zeroing every candidate."""
    model, batches = _linear(), _regression()
    probe = GradProbe(model, MagnitudePruning())
    record = probe.probe(batches, MSE, 0.5, 4, r, signed_gradients=True)
    check = pass_loss_check(probe.backend, record)
    assert abs(check["measured"]) > 1e-3  # scaling the candidates moved the loss
    assert check["predicted"] == pytest.approx(check["measured"], rel=1e-4)
    assert record.losses[0] == pytest.approx(_mean_loss(model, batches, MSE), rel=1e-6)

    (name, layer), = record.layers.items()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        dict(zeroed.named_parameters())[name].masked_fill_(layer.tentative, 0.0)
    measured = _mean_loss(zeroed, batches, MSE) - _mean_loss(model, batches, MSE)
    assert float(removal_estimate(layer, r).sum()) == pytest.approx(measured, rel=1e-4)
    # per weight: the path share is the removal estimate's first part, scaled by 1 - r
    assert float(path_estimate(layer, r).sum()) == pytest.approx(check["predicted"], rel=1e-6)


def _model():
    torch.manual_seed(0)
    return SimpleMLP(24, [32, 16], 6)


def _data(n=4, b=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 24, generator=g), torch.randint(0, 6, (b,), generator=g)) for _ in range(n)]


def test_loss_change_veto_takes_each_layers_highest_estimates():
    probe = GradProbe(_model(), WandaPruning())
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5, signed_gradients=True)
    vetoes = probe_vetoes(probe.backend, record, fraction=0.25, by="loss_change")
    by_ratio = probe_vetoes(probe.backend, record, fraction=0.25)
    for name, layer in record.layers.items():
        estimate, vetoed = removal_estimate(layer, 0.1), vetoes[name][layer.tentative]
        assert int(vetoed.sum()) == count_to_select(int(layer.tentative.sum()), 0.25)
        assert estimate[vetoed].min() >= estimate[~vetoed].max()
    assert any(not torch.equal(vetoes[n], by_ratio[n]) for n in vetoes)  # a different ranking


def test_target_mode_with_the_loss_change_veto_keeps_the_exact_quota():
    model = _model()
    masks = GradProbe(model, WandaPruning()).prune(_data(), LOSS, 0.5, 4, mode="target", veto_fraction=0.2,
                                                   veto_by="loss_change")
    for name, mask in masks.items():
        assert int(mask.sum()) == mask.shape[0] * count_to_select(mask.shape[1], 0.5)  # Wanda's per-row count
        assert bool((dict(model.named_parameters())[name][mask] == 0).all())


def _on_ranks(backend, rank, world):
    width = 32 // world
    batches = [(x[rank * width:(rank + 1) * width], y[rank * width:(rank + 1) * width]) for x, y in _data()]
    model = _model()
    probe = GradProbe(model, WandaPruning(), backend=backend)
    record = probe.probe(batches, LOSS, 0.5, 4, 0.1, oversample=1.5, signed_gradients=True)
    check = pass_loss_check(probe.backend, record)
    masks = probe.decide(record, 0.5, mode="target", veto_fraction=0.2, veto_by="loss_change")
    backend.prepare(model, probe.param_names)
    return {n: backend.gather_full(n, m) for n, m in masks.items()}, check


def _fsdp(rank, world):
    return _on_ranks(build_backend("fsdp", torch.device("cpu")), rank, world)


def test_two_fsdp_ranks_equal_one_process():
    masks, check = run_ranks(_fsdp, 2, timeout=300)[0]
    ref_masks, ref_check = _on_ranks(LocalBackend(device="cpu"), 0, 1)
    for key in ("measured", "predicted"):
        assert check[key] == pytest.approx(ref_check[key], rel=1e-4)
    for name, mask in ref_masks.items():
        assert torch.equal(masks[name].reshape(mask.shape), mask), name


def test_errors_name_the_fix():
    probe = GradProbe(_model(), WandaPruning())
    with pytest.raises(ValueError, match="veto_by='nope' is unknown"):
        probe.prune(_data(), LOSS, 0.5, 4, mode="target", veto_fraction=0.1, veto_by="nope")
    with pytest.raises(ValueError, match="pass veto_fraction"):
        probe.prune(_data(), LOSS, 0.5, 4, mode="target", veto_by="loss_change")
    with pytest.raises(ValueError, match="threshold mode decides by the gradient ratio"):
        probe.prune(_data(), LOSS, 0.5, 4, veto_by="loss_change")
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5)  # no signed gradients kept
    assert all(layer.old_signed is None for layer in record.layers.values())
    with pytest.raises(ValueError, match="signed_gradients=True"):
        probe.decide(record, 0.5, mode="target", veto_fraction=0.1, veto_by="loss_change")


def test_pipeline_loss_change_veto_equals_the_library(tmp_path):
    """``prune.veto: loss_change`` in one stage equals ``prune(mode="target", veto_by=...)``."""
    from gradprobe_dist.checkpoint.store import load_masks
    from gradprobe_dist.pipeline.stages import loss_fn_for
    from test_pipeline import job_for, make_tiny_data, write_config

    data = make_tiny_data(tmp_path / "data")
    config = write_config(tmp_path / "lc.yaml", data, output_dir=tmp_path / "lc",
                          prune={"mode": "target", "strategy": "wanda", "veto": "loss_change",
                                 "veto_fraction": 0.2, "stage_size": 0})
    job = job_for(config)
    dense, batches, cfg = copy.deepcopy(job.model), job.calibration, job.cfg.prune
    job.run()
    saved = load_masks(tmp_path / "lc")
    names = list(saved)
    masks = GradProbe(dense, WandaPruning(), include=names, extra_prunable=names).prune(
        batches, loss_fn_for(batches), cfg.sparsity, cfg.num_batches, reduction_factor=cfg.reduction_factor,
        mode="target", oversample=cfg.oversample, veto_fraction=0.2, veto_by="loss_change")
    assert masks.keys() == saved.keys()
    for name, mask in masks.items():
        assert torch.equal(saved[name], mask), name
