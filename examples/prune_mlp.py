"""The original GradProbe workflow on real data (scikit-learn's bundled 8x8 digits):
train an MLP, prune it, evaluate before/after, fine-tune with the masks kept, sweep thresholds.

    python examples/prune_mlp.py
"""
import copy

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP


def digits_loaders(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[test], y[test]), batch_size=256))


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def train(model: nn.Module, loader, epochs: int, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_loader, test_loader = digits_loaders()
    model = SimpleMLP(input_dim=64, hidden_dims=[128, 64], output_dim=10)
    train(model, train_loader, epochs=30)
    dense = copy.deepcopy(model)
    print(f"dense accuracy: {accuracy(model, test_loader):.3f}")

    pruner = GradProbe(model, MagnitudePruning(), device="cpu")
    pruner.prune(train_loader, nn.CrossEntropyLoss(), sparsity=0.5, num_batches=10,
                 reduction_factor=0.1, gradient_threshold=0.0, verbose=True)
    print(f"pruned: sparsity {pruner.get_sparsity():.2%}, accuracy {accuracy(model, test_loader):.3f}")

    pruner.apply_mask_permanently()
    train(model, train_loader, epochs=5, lr=1e-3)
    print(f"fine-tuned: sparsity {pruner.get_sparsity():.2%} (masks kept), "
          f"accuracy {accuracy(model, test_loader):.3f}")

    sweeper = GradProbe(dense, MagnitudePruning())
    results = sweeper.sweep_gradient_thresholds(
        train_loader, nn.CrossEntropyLoss(), eval_fn=lambda m: accuracy(m, test_loader),
        sparsity=0.5, thresholds=[0.0, 0.05, 0.1, 0.2, 0.5, 1.0], num_batches=10)
    print("threshold  sparsity  pruned  accuracy")
    for t, s, n, a in zip(results["thresholds"], results["sparsities"],
                          results["weights_pruned"], results["metrics"]):
        print(f"{t:9.2f}  {s:8.2%}  {n:6d}  {a:8.3f}")


if __name__ == "__main__":
    main()
