"""Tentative selection: exact counts per layer / globally / per row, deterministic ties."""
import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, MagnitudePruning, RandomPruning, SimpleMLP, WandaPruning
from gradprobe_dist.strategies import build_strategy
from gradprobe_dist.strategies.wanda import lowest_per_row


def _mlp(seed=0):
    torch.manual_seed(seed)
    return SimpleMLP(30, [40, 20], 7)


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.73])
def test_magnitude_layer_counts_and_choice(sparsity):
    model = _mlp()
    masks = MagnitudePruning("layer").select_weights_to_prune(model, sparsity)
    assert set(masks) == {"layers.0.weight", "layers.1.weight", "head.weight"}
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        w = params[name].detach().abs()
        k = int(round(w.numel() * sparsity, 6))
        assert int(mask.sum()) == k
        if 0 < k < w.numel():
            assert w[mask].max() <= w[~mask].min()


def test_magnitude_global_count_and_threshold():
    model = _mlp()
    masks = MagnitudePruning("global").select_weights_to_prune(model, 0.4)
    params = dict(model.named_parameters())
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(total * 0.4)
    chosen = torch.cat([params[n].detach().abs()[m] for n, m in masks.items()])
    rest = torch.cat([params[n].detach().abs()[~m] for n, m in masks.items()])
    assert chosen.max() <= rest.min()
    per_layer = [m.float().mean().item() for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # global scope does not equalise layers


def test_ties_broken_by_model_order_then_position():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    layer = MagnitudePruning("layer").select_weights_to_prune(model, 0.5)
    assert layer["0.weight"].flatten().tolist() == [True] * 6 + [False] * 6
    assert layer["1.weight"].flatten().tolist() == [True] * 3 + [False] * 3
    glob = MagnitudePruning("global").select_weights_to_prune(model, 0.5)  # 9 of 18 weights
    assert glob["0.weight"].flatten().tolist() == [True] * 9 + [False] * 3
    assert not glob["1.weight"].any()


def test_random_is_seeded_exact_and_differs_by_seed():
    model = _mlp()
    a = RandomPruning(seed=1).select_weights_to_prune(model, 0.3)
    b = RandomPruning(seed=1).select_weights_to_prune(model, 0.3)
    c = RandomPruning(seed=2).select_weights_to_prune(model, 0.3)
    for n in a:
        assert torch.equal(a[n], b[n])
        assert int(a[n].sum()) == int(a[n].numel() * 0.3)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_lowest_per_row_counts_and_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = lowest_per_row(scores, 2)
    assert mask.tolist() == [[False, True, False, True], [True, True, False, False]]


@pytest.mark.parametrize("ties", ["many", "none to spare"])
def test_lowest_per_row_equals_a_stable_sort_with_ties_and_infinities(ties):
    torch.manual_seed(0)
    if ties == "many":
        scores = torch.randint(0, 5, (64, 33)).float()  # many ties per row
    else:  # continuous scores: no row has more ties at its k-th value than it needs
        scores = torch.rand(64, 33)
    scores[::7, ::5] = float("inf")
    for k in (1, 7, 16, 32, 33):
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(lowest_per_row(scores, k), expected), k
    assert not lowest_per_row(scores, 0).any()


def test_wanda_norms_and_selection_match_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    batches = [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(3)]
    captured = {}
    orig_select = WandaPruning.select

    def spy(self, context, sparsity):
        captured.update({n: t.clone() for n, t in context.input_sq_norms.items()})
        return orig_select(self, context, sparsity)

    WandaPruning.select = spy
    try:
        probe = GradProbe(model, WandaPruning())
        record = probe.probe(batches, nn.CrossEntropyLoss(), 0.5, 3, 0.1)
    finally:
        WandaPruning.select = orig_select
    x = torch.cat([b[0] for b in batches])
    hidden = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(captured["0.weight"], x.pow(2).sum(0))
    torch.testing.assert_close(captured["2.weight"], hidden.pow(2).sum(0))
    for name, inputs in (("0.weight", x), ("2.weight", hidden)):
        w = dict(model.named_parameters())[name].detach()
        score = w.abs() * inputs.norm(dim=0)
        k = int(w.shape[1] * 0.5)
        expected = torch.zeros_like(w, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
        assert torch.equal(record.layers[name].tentative, expected)
        assert (record.layers[name].tentative.sum(1) == k).all()


def test_wanda_on_conv_uses_input_channel_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    batches = [(torch.randn(2, 3, 6, 6), torch.randint(0, 2, (2,))) for _ in range(2)]
    record = GradProbe(model, WandaPruning()).probe(batches, nn.CrossEntropyLoss(), 0.5, 2, 0.1)
    mask = record.layers["0.weight"].tentative
    assert mask.shape == (4, 3, 3, 3)
    assert (mask.reshape(4, -1).sum(1) == 13).all()


def test_registry_builds_and_rejects():
    assert build_strategy("magnitude", scope="global").scope == "global"
    assert build_strategy("random", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown strategy 'sparsegpt2'"):
        build_strategy("sparsegpt2")
    with pytest.raises(TypeError, match="bad options"):
        build_strategy("magnitude", scop="layer")
    with pytest.raises(ValueError, match="scope"):
        MagnitudePruning("row")
