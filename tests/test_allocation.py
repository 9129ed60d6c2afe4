"""Per-layer sparsity allocation: exact weighted mean, bounds, order, and its use in the probe."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP, WandaPruning
from gradprobe_dist.strategies.allocation import Allocation, allocate, owl_scores
from gradprobe_dist.strategies.wanda import wanda_scores
from gradprobe_dist.parallel.base import LocalSlice
from gradprobe_dist.parallel.local import LocalBackend


def test_allocate_mean_bounds_and_order():
    scores = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.3}
    numels = {"a": 100, "b": 400, "c": 50, "d": 250}
    out = allocate(scores, numels, target=0.5, spread=0.1, low=0.0, high=0.95)
    mean = sum(out[n] * numels[n] for n in out) / sum(numels.values())
    assert abs(mean - 0.5) < 1e-9
    assert out["a"] > out["c"] > out["d"] > out["b"]
    assert max(out.values()) - min(out.values()) <= 0.2 + 1e-9
    tight = allocate(scores, numels, target=0.5, spread=0.3, low=0.45, high=0.6)
    assert all(0.45 - 1e-12 <= v <= 0.6 + 1e-12 for v in tight.values())
    assert abs(sum(tight[n] * numels[n] for n in tight) / 800 - 0.5) < 1e-9
    flat = allocate({"a": 1.0, "b": 1.0}, {"a": 3, "b": 5}, 0.4, 0.1)
    assert flat == pytest.approx({"a": 0.4, "b": 0.4})


def test_owl_scores_match_direct_outlier_ratio():
    torch.manual_seed(0)
    w = {"x": torch.randn(6, 8), "y": torch.randn(4, 6)}
    norms = {"x": torch.rand(8) * 10, "y": torch.rand(6)}
    slices = {n: LocalSlice(t.shape, "full") for n, t in w.items()}
    got = owl_scores(w, slices, norms, outlier_factor=2.0, backend=LocalBackend())
    for n in w:
        score = w[n].abs() * norms[n].sqrt()
        assert torch.allclose(wanda_scores(w[n], norms[n], slices[n]), score)
        assert got[n] == pytest.approx(-float((score > 2.0 * score.mean()).float().mean()))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = SimpleMLP(32, [64, 48], 8)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(128, 32, generator=g), torch.randint(0, 8, (128,), generator=g))
    return model, DataLoader(data, batch_size=32)


def test_owl_allocation_drives_tentative_counts():
    model, loader = _setup()
    probe = GradProbe(model, WandaPruning())
    record = probe.probe(loader, nn.CrossEntropyLoss(), 0.5, 4, 0.1, allocation=Allocation("owl", spread=0.1, outlier_factor=2.0))
    alloc = probe.layer_sparsity
    numels = {n: l.tentative.numel() for n, l in record.layers.items()}
    assert abs(sum(alloc[n] * numels[n] for n in alloc) / sum(numels.values()) - 0.5) < 1e-9
    assert len(set(round(v, 6) for v in alloc.values())) > 1
    for name, layer in record.layers.items():
        cols = layer.tentative.shape[1]
        assert (layer.tentative.sum(1) == int(cols * alloc[name] + 1e-6)).all()  # Wanda: per row


def test_gradient_allocation_in_target_mode_is_exact_per_layer():
    model, loader = _setup()
    probe = GradProbe(model, MagnitudePruning())
    masks = probe.prune(loader, nn.CrossEntropyLoss(), 0.5, 4, mode="target", oversample=1.6,
                        allocation=Allocation("gradient", spread=0.1))
    alloc = probe.layer_sparsity
    for name, mask in masks.items():
        assert int(mask.sum()) == int(mask.numel() * alloc[name] + 1e-6)
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int(m.sum()) for m in masks.values()) / total - 0.5) < 0.01


@pytest.mark.parametrize("strategy, kwargs, match", [
    (MagnitudePruning(), dict(allocation=Allocation("gradient")), "needs mode='target'"),
    (MagnitudePruning("global"), dict(mode="target", allocation=Allocation("owl")), "per-layer selection"),
    (MagnitudePruning(pattern="2:4"), dict(allocation=Allocation("owl")), "per-layer selection"),
])
def test_allocation_errors(strategy, kwargs, match):
    model, loader = _setup()
    with pytest.raises(ValueError, match=match):
        GradProbe(model, strategy).prune(loader, nn.CrossEntropyLoss(), 0.5, 2, **kwargs)
    with pytest.raises(ValueError, match="allocation kind='best'"):
        Allocation("best")
