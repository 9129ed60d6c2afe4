"""Distributed SparseGPT: at 2 real gloo ranks (DDP, FSDP2 row shards, ZeRO-3 flat partitions)
the masks and updated weights equal one process's on the same global batches, unstructured
and 2:4, with and without a veto, GPT-2's transposed Conv1D included; so do GradProbe's
mode="sparsegpt" (the probe's veto inside SparseGPT)."""
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from gradprobe_dist import GradProbe, WandaPruning
from gradprobe_dist.parallel import build_backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.reconstruct.pruner import SparseGPT
from multiproc import run_ranks

BLOCKSIZE = 8  # several column blocks per layer


class Net(nn.Module):
    """Linear layers (FSDP2 splits their rows 16/16 and 6/6) and a GPT-2 Conv1D (stored
    [in, out]: its row shards cut input columns, so it is gathered)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(24, 32), nn.ReLU()),
                                     nn.Sequential(Conv1D(20, 32), nn.ReLU()),
                                     nn.Sequential(nn.Linear(20, 12))])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _batches(rank=0, world=1):
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(-1, 1, 24)
    data = [(torch.randn(16, 24, generator=g) * scales, torch.randint(0, 12, (16,), generator=g))
            for _ in range(4)]
    width = 16 // world
    return [(x[rank * width:(rank + 1) * width], y[rank * width:(rank + 1) * width]) for x, y in data]


def _full_vetoes(model):
    """A fixed pseudo-random 30% veto of every weight, full shape."""
    g = torch.Generator().manual_seed(2)
    return {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()
            if n.endswith("weight")}


def _prune(backend, rank, world, pattern, veto):
    model = Net()
    pruner = SparseGPT(model, backend=backend, pattern=pattern, blocksize=BLOCKSIZE)
    sparsity = 0.5
    hessians = pruner.hessians(_batches(rank, world), 4, nn.CrossEntropyLoss())
    vetoes = None
    if veto:
        backend.prepare(model, pruner.param_names)
        full = _full_vetoes(Net())  # ZeRO-3 leaves the model's parameters empty
        vetoes = {n: backend.scatter_full(n, full[n] if backend.is_main else None).bool()
                  for n in pruner.param_names}
        backend.release()
    masks = pruner.prune_from(hessians, sparsity, vetoes)
    backend.prepare(model, pruner.param_names)
    return ({n: backend.gather_full(n, m) for n, m in masks.items()},
            {n: backend.gather_full(n, backend.local_weight(n).detach().clone()) for n in pruner.param_names})


CASES = [(None, False), (None, True), ("2:4", True)]  # (pattern, veto)
PROBED = [None, "2:4"]


def _probe_then_sparsegpt(backend, rank, world, pattern):
    """GradProbe's mode="sparsegpt": Wanda candidates, the top 20% of ratios vetoed."""
    model = Net()
    probe = GradProbe(model, WandaPruning(pattern=pattern), backend=backend)
    masks = probe.prune(_batches(rank, world), nn.CrossEntropyLoss(), 0.5, 4, mode="sparsegpt",
                        veto_fraction=0.2)
    backend.prepare(model, probe.param_names)
    return ({n: backend.gather_full(n, m) for n, m in masks.items()},
            {n: backend.gather_full(n, backend.local_weight(n).detach().clone()) for n in probe.param_names})


def _ranked(rank, world, mode):
    plain = [_prune(build_backend(mode, torch.device("cpu")), rank, world, pattern, veto)
             for pattern, veto in CASES]
    return plain, [_probe_then_sparsegpt(build_backend(mode, torch.device("cpu")), rank, world, p)
                   for p in PROBED]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero3"])
def test_two_ranks_equal_one_process(mode):
    results, probed = run_ranks(_ranked, 2, mode, timeout=500, env={"DS_ACCELERATOR": "cpu"})[0]
    dense = dict(Net().named_parameters())
    vetoes = _full_vetoes(Net())
    for (pattern, veto), (masks, weights) in zip(CASES, results):
        masks_ref, weights_ref = _prune(LocalBackend(device="cpu"), 0, 1, pattern, veto)
        for name, mask in masks_ref.items():
            # the reference itself is a real pruning: exact quota, zeros, updated survivors
            assert 0.45 < float(mask.float().mean()) <= 0.5 + 1e-6, name
            assert (weights_ref[name][mask] == 0).all()
            assert not torch.equal(weights_ref[name][~mask], dense[name].detach()[~mask]), name
            if veto:  # vetoed weights pruned only where too few others remain
                rows = mask.T if name == "blocks.1.0.weight" else mask
                vetoed = vetoes[name].T if name == "blocks.1.0.weight" else vetoes[name]
                if pattern:
                    free = (~vetoed).reshape(rows.shape[0], -1, 4).sum(-1)
                    taken = (rows & vetoed).reshape(rows.shape[0], -1, 4).sum(-1)
                    assert torch.equal(taken, (2 - free).clamp(min=0)), name
                else:
                    assert not (rows & vetoed).any(), name
            where = f"{mode} {pattern} veto={veto} {name}"
            assert torch.equal(masks[name].reshape(mask.shape), mask), where
            torch.testing.assert_close(weights[name].reshape(mask.shape), weights_ref[name], rtol=1e-4,
                                       atol=1e-5, msg=lambda m: f"{where}: {m}")
    for pattern, (masks, weights) in zip(PROBED, probed):
        masks_ref, weights_ref = _probe_then_sparsegpt(LocalBackend(device="cpu"), 0, 1, pattern)
        for name, mask in masks_ref.items():
            assert 0.45 < float(mask.float().mean()) <= 0.5 + 1e-6, name
            where = f"{mode} GradProbe+SparseGPT {pattern} {name}"
            assert torch.equal(masks[name].reshape(mask.shape), mask), where
            torch.testing.assert_close(weights[name].reshape(mask.shape), weights_ref[name], rtol=1e-4,
                                       atol=1e-5, msg=lambda m: f"{where}: {m}")
