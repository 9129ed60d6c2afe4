"""The algorithm itself, in one process: closed-form decisions, replay, exactness, sweep."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from gradprobe_dist import GradProbe, MagnitudePruning, PruningStrategy, SimpleMLP, WandaPruning


class Diagonal(nn.Module):
    """o_i = w_i * x_i: each weight's gradient depends only on itself (closed form)."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x * self.weight


class Fixed(PruningStrategy):
    """A user strategy written against the original API: it selects a fixed set."""

    def __init__(self, masks):
        self.fixed = masks

    def select_weights_to_prune(self, model, sparsity):
        return {name: self.fixed[name].clone() for name, _ in model.named_parameters()
                if name in self.fixed}

    def get_name(self):
        return "fixed"


def half_sq(out, target):
    return 0.5 * ((out - target) ** 2).sum()


def closed_form_pruned(w, x, t, r, tau):
    """grad_i = (w_i x_i - t_i) x_i; after scaling w_i by r: (r w_i x_i - t_i) x_i."""
    old = (w * x - t).mul(x).abs()
    new = (r * w * x - t).mul(x).abs()
    return new <= old * (1 + tau)


W = [1.0, 1.0, 2.0, -1.0, 1.0, 1.0, 3.0]
X = [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
T = [0.0, 1.0, 1.5, -1.0, 0.5, 0.6, 0.0]
SELECTED = torch.tensor([True] * 6 + [False])


@pytest.mark.parametrize("tau, expected", [
    (0.0, [True, False, False, True, True, False]),   # ratios 0.1, inf, 2.6, 0.8, 0.8, 1.25
    (0.3, [True, False, False, True, True, True]),
    (2.0, [True, False, True, True, True, True]),
])
def test_closed_form_decisions(tau, expected):
    model = Diagonal(W)
    x, t = torch.tensor([X]), torch.tensor([T])
    probe = GradProbe(model, Fixed({"weight": SELECTED}), extra_prunable=["weight"])
    masks = probe.prune([(x, t)], half_sq, sparsity=0.5, num_batches=1, gradient_threshold=tau)
    formula = closed_form_pruned(torch.tensor(W), torch.tensor(X), torch.tensor(T), 0.1, tau)
    assert masks["weight"][:6].tolist() == expected == formula[:6].tolist()
    assert not masks["weight"][6]  # never selected, never pruned
    w = model.weight.detach()
    assert torch.equal(w[masks["weight"]], torch.zeros(int(masks["weight"].sum())))
    kept = ~masks["weight"]
    assert torch.equal(w[kept], torch.tensor(W)[kept])  # restored and unselected: bit-identical


def _data(n=256, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_shuffled_loader_both_passes_see_identical_batches():
    torch.manual_seed(0)
    model = SimpleMLP(20, [16], 4)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    GradProbe(model, MagnitudePruning()).prune(loader, nn.CrossEntropyLoss(), 0.5, num_batches=3)
    assert len(seen) == 6
    for first, second in zip(seen[:3], seen[3:]):
        assert torch.equal(first, second)
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("strategy", [MagnitudePruning("layer"), MagnitudePruning("global"), WandaPruning()])
def test_exactness_of_pruned_restored_and_unselected(strategy):
    torch.manual_seed(1)
    model = SimpleMLP(20, [32, 16], 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = GradProbe(model, strategy)
    record = probe.probe(DataLoader(_data(), batch_size=32), nn.CrossEntropyLoss(), 0.6, 4, 0.1)
    masks = probe.apply_decisions(record, 0.0)
    for name, p in model.named_parameters():
        w = p.detach()
        if name not in masks:  # biases: never touched
            assert torch.equal(w, before[name])
            continue
        tentative, pruned = record.layers[name].tentative, masks[name]
        assert not (pruned & ~tentative).any()
        assert (w[pruned] == 0).all()
        assert torch.equal(w[~pruned], before[name][~pruned])  # restored + unselected bit-exact
        assert 0 < int(pruned.sum()) < int(tentative.sum())  # the probe really decided
    assert probe.get_sparsity() <= 0.6


def test_model_mode_restored_and_dropout_off_during_probe():
    torch.manual_seed(0)
    model = SimpleMLP(20, [16], 4, dropout=0.5).train()
    modes = []
    model.layers[0].register_forward_pre_hook(lambda m, i: modes.append(model.training))
    GradProbe(model, MagnitudePruning()).prune(DataLoader(_data(), batch_size=16), nn.CrossEntropyLoss(), 0.5, 2)
    assert modes and not any(modes)
    assert model.training


def test_sparsity_non_decreasing_in_threshold_and_sweep_matches_prune():
    torch.manual_seed(2)
    base = SimpleMLP(20, [32, 16], 4)
    loader = DataLoader(_data(), batch_size=32)
    thresholds = [0.0, 0.05, 0.2, 1.0]
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metric = lambda m: float(sum(p.detach().abs().sum() for p in m.parameters()))  # noqa: E731
    sweep = GradProbe(model, MagnitudePruning()).sweep_gradient_thresholds(
        loader, nn.CrossEntropyLoss(), metric, sparsity=0.5, thresholds=thresholds, num_batches=4)
    for n, p in model.named_parameters():  # the sweep leaves the model as it was
        assert torch.equal(p.detach(), before[n])
    assert sweep["sparsities"] == sorted(sweep["sparsities"])
    assert sweep["sparsities"][0] < sweep["sparsities"][-1] <= 0.5
    for i, t in enumerate(thresholds):
        separate = copy.deepcopy(base)
        probe = GradProbe(separate, MagnitudePruning())
        masks = probe.prune(loader, nn.CrossEntropyLoss(), sparsity=0.5, num_batches=4, gradient_threshold=t)
        assert sweep["weights_pruned"][i] == sum(int(m.sum()) for m in masks.values())
        assert sweep["sparsities"][i] == probe.get_sparsity()
        assert sweep["metrics"][i] == metric(separate)


@pytest.mark.parametrize("statistic", ["max_abs", "mean_abs", "rms"])
def test_statistics_match_direct_computation(statistic):
    torch.manual_seed(3)
    model = SimpleMLP(8, [6], 3)
    data = _data(64, 8, 3)
    loader = DataLoader(data, batch_size=16)
    grads = []
    for x, y in loader:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model.layers[0].weight.grad.clone())
    g = torch.stack(grads)
    expected = {"max_abs": g.abs().amax(0), "mean_abs": g.abs().mean(0), "rms": g.pow(2).mean(0).sqrt()}[statistic]
    probe = GradProbe(model, MagnitudePruning(), statistic=statistic)
    record = probe.probe(loader, nn.CrossEntropyLoss(), 0.5, 4, 0.1)
    layer = record.layers["layers.0.weight"]
    torch.testing.assert_close(layer.old, expected[layer.tentative])


@pytest.mark.parametrize("statistic, kept_in", [("max_abs", torch.bfloat16), ("mean_abs", torch.float32),
                                               ("rms", torch.float32)])
def test_statistic_of_bf16_gradients_is_exact_in_what_keeps_it(statistic, kept_in):
    """A max of bf16 gradients is a bf16 value, so max_abs keeps it in bf16 at no loss (half
    the memory of float32); sums stay in stat_dtype (float32)."""
    torch.manual_seed(3)
    model = SimpleMLP(8, [6], 3).to(torch.bfloat16)
    x, y = _data(64, 8, 3).tensors
    loader = DataLoader(TensorDataset(x.to(torch.bfloat16), y), batch_size=16)
    grads = []
    for xb, yb in loader:
        model.zero_grad()
        nn.functional.cross_entropy(model(xb).float(), yb).backward()
        grads.append(model.layers[0].weight.grad.float())
    g = torch.stack(grads)
    expected = {"max_abs": g.abs().amax(0), "mean_abs": g.abs().mean(0), "rms": g.pow(2).mean(0).sqrt()}[statistic]
    probe = GradProbe(model, MagnitudePruning(), statistic=statistic)
    record = probe.probe(loader, lambda out, target: nn.functional.cross_entropy(out.float(), target), 0.5, 4, 0.1)
    layer = record.layers["layers.0.weight"]
    assert layer.old.dtype == layer.new.dtype == kept_in
    if statistic == "max_abs":
        assert torch.equal(layer.old.float(), expected[layer.tentative])  # bit-exact, not close
    else:
        torch.testing.assert_close(layer.old, expected[layer.tentative])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_finite_check_sees_nan_and_both_infinities(dtype):
    from gradprobe_dist.probe.stats import all_finite

    values = torch.randn(1000).to(dtype)
    assert bool(all_finite(values)) and bool(all_finite(values[:0]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = values.clone()
        broken[517] = bad
        assert not bool(all_finite(broken)), bad
    assert not bool(all_finite(torch.tensor([1 + 1j, complex(float("nan"), 0)])))
    assert bool(all_finite(torch.tensor([1 + 1j, 2 - 1j])))


def test_dict_batches_use_the_models_own_loss_and_compute_loss_hook():
    from gradprobe_dist import TinyGPT, TinyGPTConfig

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8))
    ids = torch.randint(0, 256, (4, 8))
    batches = [{"input_ids": ids, "labels": ids}] * 2
    a = GradProbe(copy.deepcopy(model), MagnitudePruning()).prune(batches, None, 0.5, 2)
    calls = []

    def compute_loss(m, batch):
        calls.append(1)
        return m(**batch).loss

    b = GradProbe(copy.deepcopy(model), MagnitudePruning()).prune(batches, sparsity=0.5, num_batches=2,
                                                                 compute_loss=compute_loss)
    assert len(calls) == 4
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert "lm_head.weight" not in a and "tok_emb.weight" not in a  # head and embeddings excluded


def test_the_candidate_masks_wait_packed_while_the_reduced_pass_runs(monkeypatch):
    """During the reduced pass no record holds its bool candidate mask (one byte per weight);
    afterwards each holds exactly the strategy's selection again."""
    from gradprobe_dist.probe import engine as engine_module
    from gradprobe_dist.probe.tentative import select_tentative

    torch.manual_seed(1)
    model = SimpleMLP(20, [32, 16], 4)
    probe = GradProbe(model, MagnitudePruning())
    selected, held_during_reduced = {}, []

    def spy_select(*args, **kwargs):
        masks, context, sparsities = select_tentative(*args, **kwargs)
        selected.update({n: m.clone() for n, m in masks.items()})
        return masks, context, sparsities

    real_pass, real_scale = engine_module.ProbeEngine.gradient_pass, engine_module.ProbeEngine._scale_selected
    records = {}

    def spy_scale(self, *args):
        records.update(real_scale(self, *args))
        return records

    def spy_pass(self, batches, loss_of, label, *args, **kwargs):
        if label == "reduced":
            held_during_reduced.extend(layer.tentative for layer in records.values())
        return real_pass(self, batches, loss_of, label, *args, **kwargs)

    monkeypatch.setattr("gradprobe_dist.probe.gradprobe.select_tentative", spy_select)
    monkeypatch.setattr(engine_module.ProbeEngine, "gradient_pass", spy_pass)
    monkeypatch.setattr(engine_module.ProbeEngine, "_scale_selected", spy_scale)
    record = probe.probe(DataLoader(_data(), batch_size=32), nn.CrossEntropyLoss(), 0.6, 4, 0.1)
    assert len(held_during_reduced) == len(record.layers) and all(t is None for t in held_during_reduced)
    assert set(selected) == set(record.layers)
    for name, layer in record.layers.items():
        assert layer.tentative.dtype == torch.bool and torch.equal(layer.tentative, selected[name])
