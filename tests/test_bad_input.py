"""Every bad input raises an error that names the problem, and leaves the model unchanged."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from gradprobe_dist import GradProbe, MagnitudePruning, PruningStrategy, SimpleMLP


def _setup(seed=0):
    torch.manual_seed(seed)
    model = SimpleMLP(10, [8], 3)
    data = TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,)))
    return model, DataLoader(data, batch_size=16)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, snap):
    return all(torch.equal(p.detach(), snap[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sparsity=1.0), ValueError, r"sparsity=1.0 is outside \[0, 1\)"),
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(sparsity="half"), TypeError, "sparsity must be a number"),
    (dict(sparsity=math.nan), ValueError, "sparsity=nan is not finite"),
    (dict(reduction_factor=0.0), ValueError, r"reduction_factor=0.0 is outside \(0, 1\)"),
    (dict(reduction_factor=1.0), ValueError, "reduction_factor"),
    (dict(gradient_threshold=-0.1), ValueError, "gradient_threshold=-0.1 is negative"),
    (dict(num_batches=0), ValueError, "num_batches=0 must be >= 1"),
    (dict(num_batches=2.5), TypeError, "num_batches must be an int"),
    (dict(num_batches=5), ValueError, "only 4 batches but num_batches=5"),
])
def test_bad_arguments(kwargs, error, match):
    model, loader = _setup()
    snap = _snapshot(model)
    args = dict(sparsity=0.5, num_batches=2) | kwargs
    with pytest.raises(error, match=match):
        GradProbe(model, MagnitudePruning()).prune(loader, nn.CrossEntropyLoss(), **args)
    assert _unchanged(model, snap)


def test_empty_dataloader():
    model, _ = _setup()
    with pytest.raises(ValueError, match="the dataloader is empty"):
        GradProbe(model, MagnitudePruning()).prune([], nn.CrossEntropyLoss(), 0.5, 2)


def test_model_with_nothing_to_prune():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no prunable parameters.*include="):
        GradProbe(model, MagnitudePruning())


def test_wrong_types_for_model_and_strategy():
    model, _ = _setup()
    with pytest.raises(TypeError, match="strategy must be a PruningStrategy"):
        GradProbe(model, "magnitude")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GradProbe("model", MagnitudePruning())
    with pytest.raises(ValueError, match="unknown gradient statistic 'median'"):
        GradProbe(model, MagnitudePruning(), statistic="median")


class NanAfter(nn.Module):
    """Gives NaN outputs for the batch whose first input is exactly 99 (in either pass)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        out = self.fc(x)
        return out * float("nan") if x[0, 0] == 99 else out


@pytest.mark.parametrize("bad_batch", [0, 2])
def test_nan_gradient_names_batch_and_parameter(bad_batch):
    torch.manual_seed(0)
    model = NanAfter()
    snap = _snapshot(model)
    batches = [(torch.randn(4, 2), torch.randint(0, 2, (4,))) for _ in range(3)]
    batches[bad_batch][0][0, 0] = 99
    with pytest.raises(FloatingPointError, match=f"batch {bad_batch} of the baseline pass, in parameter 'fc.weight'"):
        GradProbe(model, MagnitudePruning()).prune(batches, nn.CrossEntropyLoss(), 0.5, 3)
    assert _unchanged(model, snap)
    assert model.fc.weight.grad is None


class ExplodesWhenShrunk(nn.Module):
    """Finite at first; NaN once a weight has been scaled down (the second pass)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.start = self.fc.weight.detach().clone()

    def forward(self, x):
        out = self.fc(x)
        return out if torch.equal(self.fc.weight, self.start) else out * float("inf")


def test_nan_in_second_pass_restores_the_model():
    torch.manual_seed(0)
    model = ExplodesWhenShrunk()
    snap = _snapshot(model)
    batches = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    with pytest.raises(FloatingPointError, match="reduced pass"):
        GradProbe(model, MagnitudePruning()).prune(batches, nn.CrossEntropyLoss(), 0.5, 1)
    assert _unchanged(model, snap)


class BadStrategy(PruningStrategy):
    def __init__(self, make):
        self.make = make

    def select_weights_to_prune(self, model, sparsity):
        return self.make(dict(model.named_parameters()))

    def get_name(self):
        return "bad"


@pytest.mark.parametrize("make, error, match", [
    (lambda p: {"nope.weight": torch.zeros(3, dtype=torch.bool)}, ValueError, r"unknown parameters \['nope.weight'\]"),
    (lambda p: {"layers.0.weight": torch.zeros(3, 3, dtype=torch.bool)}, ValueError, r"shape \[3, 3\] for 'layers.0.weight'"),
    (lambda p: {"layers.0.weight": torch.zeros_like(p["layers.0.weight"])}, TypeError, "dtype torch.float32"),
    (lambda p: [1, 2], TypeError, "must return a dict"),
])
def test_bad_strategy_output(make, error, match):
    model, loader = _setup()
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        GradProbe(model, BadStrategy(make)).prune(loader, nn.CrossEntropyLoss(), 0.5, 2)
    assert _unchanged(model, snap)


def test_unused_parameter_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'unused.weight' received no gradient.*exclude="):
        GradProbe(model, MagnitudePruning()).prune([(torch.randn(2, 3), torch.tensor([0, 1]))],
                                                   nn.CrossEntropyLoss(), 0.5, 1)
    assert _unchanged(model, snap)


def test_pair_batches_without_loss_fn():
    model, loader = _setup()
    with pytest.raises(ValueError, match="loss_fn is None"):
        GradProbe(model, MagnitudePruning()).prune(loader, None, 0.5, 1)


def test_sweep_rejects_bad_thresholds():
    model, loader = _setup()
    with pytest.raises(ValueError, match="negative"):
        GradProbe(model, MagnitudePruning()).sweep_gradient_thresholds(
            loader, nn.CrossEntropyLoss(), lambda m: 0.0, 0.5, [0.0, -1.0], 2)
    with pytest.raises(ValueError, match="thresholds is empty"):
        GradProbe(model, MagnitudePruning()).sweep_gradient_thresholds(
            loader, nn.CrossEntropyLoss(), lambda m: 0.0, 0.5, [], 2)


@pytest.mark.parametrize("bad", ["layers.1.weight", "head.weight", "layers.0.bias"])
def test_nan_weight_is_named_as_the_weight_not_as_bad_data(bad):
    torch.manual_seed(0)
    model = SimpleMLP(10, [8, 8], 3)
    with torch.no_grad():
        dict(model.named_parameters())[bad].view(-1)[0] = float("nan")
    batches = [(torch.randn(4, 10), torch.randint(0, 3, (4,))) for _ in range(2)]
    with pytest.raises((ValueError, FloatingPointError)) as err:
        GradProbe(model, MagnitudePruning()).prune(batches, nn.CrossEntropyLoss(), 0.5, 2)
    assert f"'{bad}'" in str(err.value) and "calibration batch" not in str(err.value), str(err.value)
