"""Permanent masks survive training; torch.nn.utils.prune export round-trips; Quick Start."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from gradprobe_dist import (GradProbe, MagnitudePruning, PruningStrategy, SimpleMLP,
                            from_torch_prune, to_torch_prune)


def _pruned_model():
    torch.manual_seed(0)
    model = SimpleMLP(784, [64, 32], 10)
    data = TensorDataset(torch.randn(128, 784), torch.randint(0, 10, (128,)))
    loader = DataLoader(data, batch_size=32, shuffle=True)
    probe = GradProbe(model, MagnitudePruning(), device="cpu")
    masks = probe.prune(loader, nn.CrossEntropyLoss(), sparsity=0.5, num_batches=4, gradient_threshold=0.5)
    return model, probe, masks, loader


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
])
def test_masks_survive_training(make_opt):
    model, probe, masks, loader = _pruned_model()
    probe.apply_mask_permanently()
    opt = make_opt(model.parameters())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = list(loader)
    for step in range(20):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name].detach()[mask] == 0).all(), name  # even right after a step
        assert not torch.equal(params[name].detach()[~mask], start[name][~mask])  # others train
    probe.remove_mask_hooks()


def test_without_hooks_training_revives_pruned_weights():
    """The control for the test above: the hooks are what keeps the zeros."""
    model, probe, masks, loader = _pruned_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in list(loader)[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    name = next(iter(masks))
    assert (dict(model.named_parameters())[name].detach()[masks[name]] != 0).any()


def test_torch_prune_export_round_trip():
    model, probe, masks, loader = _pruned_model()
    x = next(iter(loader))[0]
    expected = model(x).detach()
    to_torch_prune(model, masks)
    assert hasattr(model.layers[0], "weight_orig") and hasattr(model.layers[0], "weight_mask")
    assert torch.equal(model.layers[0].weight_mask, (~masks["layers.0.weight"]).float())
    torch.testing.assert_close(model(x), expected)
    back = from_torch_prune(model)
    assert set(back) == set(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    assert isinstance(model.layers[0].weight, nn.Parameter) and not hasattr(model.layers[0], "weight_mask")
    torch.testing.assert_close(model(x), expected)


def test_apply_mask_permanently_needs_prune_first():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="call prune"):
        GradProbe(SimpleMLP(4, [3], 2), MagnitudePruning()).apply_mask_permanently()


class MyCustomStrategy(PruningStrategy):
    """Verbatim shape of the original README's example: masks for every parameter."""

    def select_weights_to_prune(self, model: nn.Module, sparsity: float):
        masks = {}
        for name, param in model.named_parameters():
            masks[name] = param.abs() < param.abs().quantile(sparsity)
        return masks

    def get_name(self) -> str:
        return "my_custom_strategy"


def test_original_quick_start_and_custom_strategy():
    from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP  # the only change: the import

    model = SimpleMLP(input_dim=784, hidden_dims=[512, 256], output_dim=10)
    strategy = MagnitudePruning()
    pruner = GradProbe(model, strategy, device="cpu")
    data = TensorDataset(torch.randn(64, 784), torch.randint(0, 10, (64,)))
    dataloader = DataLoader(data, batch_size=32, shuffle=True)
    pruning_masks = pruner.prune(dataloader=dataloader, loss_fn=nn.CrossEntropyLoss(), sparsity=0.5,
                                 num_batches=2, reduction_factor=0.1, gradient_threshold=0.0, verbose=True)
    assert 0 < pruner.get_sparsity() <= 0.5
    pruner.apply_mask_permanently()
    assert set(pruning_masks) == {"layers.0.weight", "layers.1.weight", "head.weight"}

    model2 = copy.deepcopy(model)
    biases = {n: p.detach().clone() for n, p in model2.named_parameters() if n.endswith("bias")}
    custom = GradProbe(model2, MyCustomStrategy())
    masks = custom.prune(dataloader, nn.CrossEntropyLoss(), sparsity=0.3, num_batches=2)
    assert set(masks) == set(pruning_masks)  # bias masks are ignored: biases are not prunable
    assert all(torch.equal(p.detach(), biases[n]) for n, p in model2.named_parameters() if n in biases)
    assert any(m.any() for m in masks.values())
