"""Target mode reaches the requested sparsity exactly; N:M patterns are valid on every layer."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP, WandaPruning
from gradprobe_dist.probe.decision import check_nm, lowest_in_groups
from gradprobe_dist.probe.record import gradient_ratio


def _setup(seed=0):
    torch.manual_seed(seed)
    model = SimpleMLP(32, [64, 32], 8)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(128, 32, generator=g), torch.randint(0, 8, (128,), generator=g))
    return model, DataLoader(data, batch_size=32)


def test_gradient_ratio_edge_cases():
    old = torch.tensor([2.0, 0.0, 0.0, 1.0])
    new = torch.tensor([1.0, 0.0, 3.0, 1.0])
    assert gradient_ratio(old, new).tolist() == [0.5, 1.0, float("inf"), 1.0]


def test_lowest_in_groups_and_check_nm():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    mask = lowest_in_groups(scores, 2, 4)
    assert mask.tolist() == [[False, True, False, True, True, True, False, False]]
    check_nm(mask, 2, 4, exact=True)
    with pytest.raises(ValueError, match="violate the 1:4 pattern"):
        check_nm(mask, 1, 4, exact=False)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6])
def test_target_mode_layer_scope_is_exact(sparsity):
    """(Which weights it picks: tests/test_target_veto.py.)"""
    model, loader = _setup()
    probe = GradProbe(model, MagnitudePruning())
    masks = probe.prune(loader, nn.CrossEntropyLoss(), sparsity, num_batches=4, mode="target", oversample=1.5)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert int(mask.sum()) == int(mask.numel() * sparsity + 1e-6)
        assert (params[name].detach()[mask] == 0).all()
    assert probe.equivalent_threshold is not None and probe.equivalent_threshold >= 0


def test_target_mode_global_scope_total_is_exact():
    model, loader = _setup()
    masks = GradProbe(model, MagnitudePruning("global")).prune(
        loader, nn.CrossEntropyLoss(), 0.5, 4, mode="target", target_scope="global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == total // 2


def test_target_mode_beats_the_threshold_mode_shortfall():
    model, loader = _setup()
    thr = copy.deepcopy(model)
    GradProbe(thr, MagnitudePruning()).prune(loader, nn.CrossEntropyLoss(), 0.5, 4)
    tgt = GradProbe(model, MagnitudePruning())
    tgt.prune(loader, nn.CrossEntropyLoss(), 0.5, 4, mode="target")
    assert GradProbe(thr, MagnitudePruning()).get_sparsity() < 0.5 - 1e-3
    assert abs(tgt.get_sparsity() - 0.5) < 1e-3


def test_wanda_nm_target_exactly_n():
    model, loader = _setup()
    masks = GradProbe(model, WandaPruning(pattern="2:4")).prune(
        loader, nn.CrossEntropyLoss(), 0.5, 4, mode="target")
    for mask in masks.values():
        check_nm(mask, 2, 4, exact=True)


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_threshold_at_most_n_and_target_exactly_n(pattern, n, m):
    model, loader = _setup()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    tentative = MagnitudePruning(pattern=pattern).select_weights_to_prune(model, n / m)
    for mask in tentative.values():
        check_nm(mask, n, m, exact=True)
    thr = GradProbe(copy.deepcopy(model), MagnitudePruning(pattern=pattern)).prune(
        loader, nn.CrossEntropyLoss(), n / m, 4)
    for mask in thr.values():
        check_nm(mask, n, m, exact=False)
    tgt_model = copy.deepcopy(model)
    tgt = GradProbe(tgt_model, MagnitudePruning(pattern=pattern)).prune(
        loader, nn.CrossEntropyLoss(), n / m, 4, mode="target", oversample=1.5)
    params = dict(tgt_model.named_parameters())
    for name, mask in tgt.items():
        check_nm(mask, n, m, exact=True)
        w = params[name].detach()
        assert (w[mask] == 0).all() and torch.equal(w[~mask], before[name][~mask])
        rows = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (rows == n).all()  # the weights themselves carry exactly the N:M zeros


def test_nm_errors():
    model, loader = _setup()
    with pytest.raises(ValueError, match="pass sparsity=0.5"):
        GradProbe(model, MagnitudePruning(pattern="2:4")).prune(loader, nn.CrossEntropyLoss(), 0.3, 2)
    with pytest.raises(ValueError, match="not N:M"):
        MagnitudePruning(pattern="2-4")
    with pytest.raises(ValueError, match="0 < N < M"):
        MagnitudePruning(pattern="4:4")
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        MagnitudePruning(pattern="2:4").select_weights_to_prune(odd, 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="exact"), "mode='exact' is unknown"),
    (dict(mode="target", oversample=0.5), "oversample=0.5 must be a number >= 1"),
    (dict(mode="target", target_scope="row"), "target_scope='row' is unknown"),
])
def test_bad_mode_arguments(kwargs, match):
    model, loader = _setup()
    with pytest.raises(ValueError, match=match):
        GradProbe(model, MagnitudePruning()).prune(loader, nn.CrossEntropyLoss(), 0.5, 2, **kwargs)
