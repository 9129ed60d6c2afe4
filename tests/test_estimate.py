"""Loss-change estimates from the probe's two passes (probe/estimate.py): exact on a loss that
is quadratic in the weights, the veto they rank, the same on 2 FSDP2 ranks as in one
process, and the error without signed gradients."""
import copy

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP, WandaPruning
from gradprobe_dist.parallel import build_backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe.estimate import pass_loss_check, removal_estimate
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


def _model():
    torch.manual_seed(0)
    return SimpleMLP(24, [32, 16], 6)


def _data(n=4, b=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 24, generator=g), torch.randint(0, 6, (b,), generator=g)) for _ in range(n)]


def _estimate(layer):
    return removal_estimate(layer, 0.1)


def test_a_veto_by_the_estimate_takes_each_layers_highest_estimates():
    probe = GradProbe(_model(), WandaPruning())
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5, signed_gradients=True)
    vetoes = probe_vetoes(probe.backend, record, fraction=0.25, score=_estimate)
    by_ratio = probe_vetoes(probe.backend, record, fraction=0.25)
    for name, layer in record.layers.items():
        estimate, vetoed = _estimate(layer), vetoes[name][layer.tentative]
        assert int(vetoed.sum()) == count_to_select(int(layer.tentative.sum()), 0.25)
        assert estimate[vetoed].min() >= estimate[~vetoed].max()
    assert any(not torch.equal(vetoes[n], by_ratio[n]) for n in vetoes)  # a different ranking


def _on_ranks(backend, rank, world):
    width = 32 // world
    batches = [(x[rank * width:(rank + 1) * width], y[rank * width:(rank + 1) * width]) for x, y in _data()]
    model = _model()
    probe = GradProbe(model, WandaPruning(), backend=backend)
    record = probe.probe(batches, LOSS, 0.5, 4, 0.1, oversample=1.5, signed_gradients=True)
    check = pass_loss_check(probe.backend, record)
    vetoes = probe_vetoes(probe.backend, record, fraction=0.2, score=_estimate)
    estimates = {n: torch.zeros(layer.tentative.shape).masked_scatter_(layer.tentative, _estimate(layer))
                 for n, layer in record.layers.items()}
    backend.prepare(model, probe.param_names)
    return ({n: backend.gather_full(n, v) for n, v in vetoes.items()},
            {n: backend.gather_full(n, e) for n, e in estimates.items()}, check)


def _fsdp(rank, world):
    return _on_ranks(build_backend("fsdp", torch.device("cpu")), rank, world)


def test_two_fsdp_ranks_equal_one_process():
    """Rank-averaged signed gradients: the same estimates, pass check and vetoes."""
    vetoes, estimates, check = run_ranks(_fsdp, 2, timeout=300)[0]
    ref_vetoes, ref_estimates, ref_check = _on_ranks(LocalBackend(device="cpu"), 0, 1)
    for key in ("measured", "predicted"):
        assert check[key] == pytest.approx(ref_check[key], rel=1e-4)
    for name, veto in ref_vetoes.items():
        assert torch.allclose(estimates[name].reshape(veto.shape), ref_estimates[name], rtol=1e-4, atol=1e-9)
        assert torch.equal(vetoes[name].reshape(veto.shape), veto), name


def test_estimates_need_the_signed_gradients():
    probe = GradProbe(_model(), WandaPruning())
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5)  # not kept by default
    layer = next(iter(record.layers.values()))
    assert layer.old_signed is None and layer.new_signed is None
    with pytest.raises(ValueError, match="signed_gradients=True"):
        removal_estimate(layer, 0.1)
    with pytest.raises(ValueError, match="signed_gradients=True"):
        pass_loss_check(probe.backend, record)
