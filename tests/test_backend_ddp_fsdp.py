"""DDP and FSDP2 backends on 2 real gloo ranks, checked against one process on the same
global batch; plus the shared collectives (uneven and empty shards, errors on every rank)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from multiproc import run_ranks

WORLD = 2
GLOBAL_BATCH = 8


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.out(torch.relu(self.fc(x)))


class TinyNet(nn.Module):
    """Blocks in a ModuleList, then weights the root owns: ``proj`` directly (5 rows: uneven
    over 2 ranks) and ``head`` (1 row: rank 1 holds none), which FSDP puts in the root unit."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(6), Block(6)])
        self.proj = nn.Parameter(torch.randn(5, 6) * 0.4)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(torch.relu(x @ self.proj.T))


TINY_PRUNABLE = ["blocks.0.fc.weight", "blocks.0.out.weight", "blocks.1.fc.weight",
                 "blocks.1.out.weight", "proj", "head.weight"]


def sequential_net():
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 1))


SEQ_PRUNABLE = ["0.weight", "2.weight", "4.weight"]
MODELS = {"tiny": (TinyNet, TINY_PRUNABLE), "sequential": (sequential_net, SEQ_PRUNABLE)}


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, generator=gen)


def mse(module, x, y):
    return (module(x).reshape(-1) - y).pow(2).mean()


def edit_mask(shape: torch.Size) -> torch.Tensor:
    """Every third entry of the flattened weight, so each rank's part gets some."""
    return (torch.arange(shape.numel()) % 3 == 0).reshape(shape)


def reference_grads(model, names, x, y):
    model.zero_grad()
    loss = mse(model, x, y)
    loss.backward()
    params = dict(model.named_parameters())
    return loss.detach(), {n: params[n].grad.clone() for n in names}


def make_backend(kind):
    if kind == "ddp":
        from gradprobe_dist.parallel.ddp import DDPBackend
        return DDPBackend()
    from gradprobe_dist.parallel.fsdp import FSDPBackend
    return FSDPBackend()


def weight_shape(backend, name):
    return backend.local_slice(name).full_shape


def fsdp_units(model):
    from torch.distributed.fsdp import FSDPModule

    return sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))


def global_loss(backend, loss):
    return backend.all_reduce(loss.detach().clone(), "sum") / backend.world_size


def local_of(backend, name, full):
    """The reference tensor cut where ``local_slice`` says this rank's part lies."""
    part = backend.local_slice(name)
    lo, hi = part.flat_range()
    return full.flatten()[lo:hi]


def check_grads(backend, names, ref_grads, tag):
    for name in names:
        local = backend.local_grad(name)
        assert local is not None, f"{tag}: no gradient for {name}"
        assert torch.allclose(local.flatten(), local_of(backend, name, ref_grads[name]), atol=1e-6), (tag, name)


def _exercise(rank, world_size, kind, model_key):
    """The probe's sequence of calls; every result compared with the one-process reference."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from gradprobe_dist.parallel.base import LocalSlice

    build, names = MODELS[model_key]
    torch.manual_seed(0)
    model = build()
    frozen_bias = next(n for n, _ in model.named_parameters() if n.endswith("bias"))
    model.get_parameter(frozen_bias).requires_grad_(False)
    reference = copy.deepcopy(model)
    original_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = batch()
    mine = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    ref_params = dict(reference.named_parameters())
    ref_loss, ref_grads = reference_grads(reference, names, x, y)
    report = {}

    backend = make_backend(kind)
    wrapped = backend.prepare(model, names)
    report["fsdp_units"] = fsdp_units(model)
    prepared_params = {n: model.get_parameter(n) for n in names}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)

    # (a) rank-averaged local gradients, (b) the slice they describe
    loss = mse(wrapped, x[mine], y[mine])
    backend.backward(loss)
    assert torch.allclose(global_loss(backend, loss), ref_loss, atol=1e-6)
    check_grads(backend, names, ref_grads, "first pass")
    for name in names:
        part = backend.local_slice(name)
        full = ref_params[name].detach()
        assert isinstance(part, LocalSlice) and part.full_shape == full.shape
        local = backend.local_weight(name)
        if backend.replicated:
            assert part.layout == "full"
        else:  # FSDP2 splits dim 0 like torch.chunk
            rows = torch.arange(full.shape[0]).chunk(world_size)
            expected = rows[rank] if rank < len(rows) else torch.arange(0)
            assert part.layout == "rows" and part.stop - part.start == len(expected)
            if len(expected):
                assert (part.start, part.stop) == (int(expected[0]), int(expected[-1]) + 1)
            assert local.shape == (part.stop - part.start, *full.shape[1:])
        assert torch.equal(local.flatten(), local_of(backend, name, full))
        # (e) the parts add up to the whole weight
        count = backend.sum_over_shards(torch.tensor(local.numel()))
        assert int(count) == full.numel(), (name, int(count))
    backend.zero_grad()
    assert all(backend.local_grad(n) is None for n in names)

    # (c) edit, commit, see the edit; restore, commit, get the old forward back bit-exactly.
    # The no_grad forwards leave FSDP's root unit (proj, head) unsharded: the trap.
    with torch.no_grad():
        before = wrapped(x[mine])
    if kind == "fsdp" and model_key == "tiny":
        assert not isinstance(model.proj, DTensor), "root unit not unsharded: the trap is not exercised"
    edited = copy.deepcopy(reference)
    saved = {}
    with torch.no_grad():
        for name in names:
            weight, full_mask = backend.local_weight(name), edit_mask(weight_shape(backend, name))
            saved[name] = weight.clone()
            weight[local_of(backend, name, full_mask).reshape(weight.shape)] *= 0.1
            edited.get_parameter(name)[full_mask] *= 0.1
    backend.commit_weights(names)
    edited_loss, edited_grads = reference_grads(edited, names, x, y)
    loss = mse(wrapped, x[mine], y[mine])
    backend.backward(loss)
    assert torch.allclose(global_loss(backend, loss), edited_loss, atol=1e-6)
    assert not torch.allclose(edited_loss, ref_loss, atol=1e-4), "the edit must matter"
    check_grads(backend, names, edited_grads, "after edit")
    backend.zero_grad()
    with torch.no_grad():
        wrapped(x[mine])
        for name in names:
            backend.local_weight(name).copy_(saved[name])
    backend.commit_weights(names)
    with torch.no_grad():
        assert torch.equal(wrapped(x[mine]), before)

    # (d) gather_full / scatter_full round trip, for a weight and for a bool mask
    for name in names:
        full_weight = backend.gather_full(name, backend.local_weight(name))
        full_ref = ref_params[name].detach()
        mask = edit_mask(full_ref.shape) ^ (full_ref > 0)
        full_mask = backend.gather_full(name, local_of(backend, name, mask).reshape(backend.local_weight(name).shape))
        if rank == 0:
            assert torch.equal(full_weight, full_ref) and torch.equal(full_mask, mask)
        else:
            assert full_weight is None and full_mask is None
        back = backend.scatter_full(name, full_mask)
        assert back.dtype == torch.bool and torch.equal(back.flatten(), local_of(backend, name, mask))
        assert back.shape == backend.local_weight(name).shape

    # (f) a second prepare reuses the wrapping; a later stage with fewer weights still agrees
    assert backend.prepare(model, names) is wrapped
    assert all(model.get_parameter(n) is prepared_params[n] for n in names), "wrapped again"
    stage = names[1:3]
    staged = backend.prepare(model, stage)
    if kind == "fsdp":
        assert staged is model and fsdp_units(model) == report["fsdp_units"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == stage
    _, stage_grads = reference_grads(reference, stage, x, y)
    backend.backward(mse(staged, x[mine], y[mine]))
    check_grads(backend, stage, stage_grads, "second stage")
    assert all(backend.local_grad(n) is None for n in names if n not in stage), "frozen weights got grads"
    backend.zero_grad()
    backend.release()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == original_flags

    backend.barrier()
    report["object"] = backend.broadcast_object({"rank": rank})
    dist.barrier()
    return report


@pytest.mark.parametrize("kind, model_key, units", [
    ("ddp", "tiny", []),
    ("fsdp", "tiny", ["", "blocks.0", "blocks.1"]),
    ("fsdp", "sequential", ["", "0", "2", "4"]),
])
def test_backend_matches_one_process(kind, model_key, units):
    reports = run_ranks(_exercise, WORLD, kind, model_key, timeout=120)
    assert [r["fsdp_units"] for r in reports] == [units] * WORLD
    assert [r["object"] for r in reports] == [{"rank": 0}] * WORLD


def _collectives_and_errors(rank, world_size):
    from gradprobe_dist.parallel import collectives as C

    out = {}
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    # rows: rank 0 holds all 4 rows, rank 1 none (an empty shard sits at the end)
    start, stop = [(0, 4), (4, 4)][rank]
    out["rows"] = C.gather_rows(full[start:stop], start, stop, full.shape)
    out["rows_back"] = C.scatter_rows(full if rank == 0 else None, start, stop)
    # flat, uneven: [0, 7) and [7, 12)
    lo, hi = [(0, 7), (7, 12)][rank]
    out["flat"] = C.gather_flat(full.flatten()[lo:hi], lo, hi, 12)
    out["flat_back"] = C.scatter_flat(full if rank == 0 else None, lo, hi)
    out["bcast"] = C.broadcast_tensor(full.int() if rank == 0 else None)
    values = torch.tensor([rank + 1.0, -rank])
    out["sum"] = C.all_reduce(values.clone(), "sum")
    out["max"] = C.all_reduce(values.clone(), "max")
    out["min"] = C.all_reduce(values.clone(), "min")
    errors = []
    for call in (
        lambda: C.all_reduce(values, "mean"),
        lambda: C.gather_flat(full.flatten()[lo:hi - rank], lo, hi, 12),   # rank 1 passes one too few
        lambda: C.gather_flat(full.flatten()[lo:hi], lo, hi, 13),          # ranges miss the last element
        lambda: C.scatter_rows(None, start, stop),                          # the source passes nothing
    ):
        with pytest.raises(ValueError) as caught:
            call()
        errors.append(str(caught.value))
    for kind in ("ddp", "fsdp"):  # names must come from the unwrapped model
        with pytest.raises(ValueError) as caught:
            make_backend(kind).prepare(TinyNet(), ["blocks.0.fc.weight", "blocks.9.fc.weight"])
        errors.append(str(caught.value))
    out["errors"] = errors
    return out


def test_collectives_uneven_empty_parts_and_errors():
    reports = run_ranks(_collectives_and_errors, WORLD, timeout=60)
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    main, other = reports
    assert torch.equal(main["rows"], full) and other["rows"] is None
    assert torch.equal(main["rows_back"], full) and other["rows_back"].shape == (0, 3)
    assert torch.equal(main["flat"], full.flatten()) and other["flat"] is None
    assert torch.equal(main["flat_back"], full.flatten()[:7]) and torch.equal(other["flat_back"], full.flatten()[7:])
    for report in reports:
        assert torch.equal(report["bcast"], full.int())
        assert report["sum"].tolist() == [3.0, -1.0]
        assert report["max"].tolist() == [2.0, 0.0]
        assert report["min"].tolist() == [1.0, -1.0]
        assert "use one of" in report["errors"][0]
        assert "ranks [1]" in report["errors"][1]
        assert "do not tile" in report["errors"][2]
        assert "must pass the full tensor" in report["errors"][3]
        assert all("['blocks.9.fc.weight']" in e and "named_parameters" in e for e in report["errors"][4:])


def test_unit_names():
    from gradprobe_dist.parallel.fsdp import unit_names

    assert unit_names(TinyNet(), TINY_PRUNABLE) == ["blocks.0", "blocks.1"]
    assert unit_names(sequential_net(), ["0.weight", "4.weight"]) == ["0", "4"]
    assert unit_names(TinyNet(), TINY_PRUNABLE, ["blocks.*.fc", "head"]) == ["blocks.0.fc", "blocks.1.fc", "head"]
    assert unit_names(TinyNet(), TINY_PRUNABLE, ["blocks.*"]) == ["blocks.0", "blocks.1"]  # * stays in one part
    with pytest.raises(ValueError, match="match no module"):
        unit_names(TinyNet(), TINY_PRUNABLE, ["layers.*"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_needs_a_process_group(kind):
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_backend(kind)
