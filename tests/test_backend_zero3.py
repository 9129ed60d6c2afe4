"""Zero3Backend on 2 real gloo ranks against one process running the same global batch."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from multiproc import run_ranks  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")
WORLD = 2
ENV = {"DS_ACCELERATOR": "cpu"}
STAGE1 = ["blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight", "head.weight", "scale"]
STAGE2 = ["blocks.1.fc2.weight", "blocks.0.fc1.bias"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 5)  # 35 elements: odd, so padded

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyNet(nn.Module):
    """Blocks plus a head, and a 1-element weight owned by the root (one rank's slice is empty)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(5, 1)
        self.scale = nn.Parameter(torch.full((1,), 1.5))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.scale


def build_model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    model.head.bias.requires_grad_(False)  # frozen before the engine exists
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def edit_mask(start: int, stop: int) -> torch.Tensor:
    """The entries the test scales by 0.1: every third element of weight.flatten()."""
    return torch.arange(start, stop) % 3 == 0


def np_or_none(t):
    """Ranks return numpy: a tensor sent through the result queue is shared by file
    descriptor and cannot be read once its rank has exited."""
    return None if t is None else t.detach().cpu().numpy().copy()


def probe_ranks(rank, world_size):
    """Everything the probe does with a backend, recorded for comparison with ``reference``."""
    import deepspeed

    from gradprobe_dist.parallel.zero3 import Zero3Backend

    built = []
    real_initialize = deepspeed.initialize
    deepspeed.initialize = lambda *a, **k: built.append(1) or real_initialize(*a, **k)

    x, y = global_batch()
    x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    model = build_model()
    backend = Zero3Backend(micro_batch_size=len(x))
    out = {}

    def step(names):
        loss = loss_of(engine, x, y)
        backend.backward(loss)
        grads = {n: np_or_none(backend.local_grad(n)) for n in names}
        backend.zero_grad()
        return loss.item(), grads

    engine = backend.prepare(model, STAGE1)
    out["flags_stage1"] = {n: p.requires_grad for n, p in model.named_parameters()}
    out["slices"] = {n: backend.local_slice(n) for n in STAGE1}
    out["loss0"], out["grads0"] = step(STAGE1 + ["blocks.0.fc1.bias"])
    out["loss_again"], out["grads_again"] = step(STAGE1)
    out["grad_after_zero"] = backend.local_grad(STAGE1[0])

    with torch.no_grad():
        loss_of(engine, x, y)  # a forward without backward must not leave weights gathered
    dict(model.named_parameters())[STAGE1[0]].all_gather()  # a stale gathered copy commit must drop
    saved = {n: backend.local_weight(n).clone() for n in STAGE1}
    out["weights"] = {n: np_or_none(w) for n, w in saved.items()}
    with torch.no_grad():
        for n in STAGE1:
            s = backend.local_slice(n)
            w = backend.local_weight(n)
            w[edit_mask(s.start, s.stop)] *= 0.1
    backend.commit_weights(STAGE1)
    out["loss_edit"], out["grads_edit"] = step(STAGE1)
    with torch.no_grad():
        for n in STAGE1:
            backend.local_weight(n).copy_(saved[n])
    backend.commit_weights(STAGE1)
    out["loss_restored"], out["grads_restored"] = step(STAGE1)

    out["gathered"], out["scattered"], out["numel_sum"] = {}, {}, {}
    for n in STAGE1:
        full = backend.gather_full(n, backend.local_weight(n))
        out["gathered"][n] = np_or_none(full)
        out["scattered"][n] = np_or_none(backend.scatter_full(n, full))
        count = torch.tensor(backend.local_weight(n).numel())
        out["numel_sum"][n] = int(backend.sum_over_shards(count))
    grad_full = backend.gather_full("blocks.0.fc1.weight", torch.from_numpy(out["grads0"]["blocks.0.fc1.weight"]))
    out["gathered_grad"] = np_or_none(grad_full)

    out["max_rank"] = int(backend.all_reduce(torch.tensor(rank), "max"))
    out["min_rank"] = int(backend.all_reduce(torch.tensor(rank), "min"))
    out["broadcast"] = backend.broadcast_object({"from": rank})

    again = backend.prepare(model, STAGE2)
    out["same_engine"] = again is engine
    out["flags_stage2"] = {n: p.requires_grad for n, p in model.named_parameters()}
    out["loss_stage2"], out["grads_stage2"] = step(STAGE2 + ["blocks.0.fc1.weight"])
    backend.release()
    out["flags_released"] = {n: p.requires_grad for n, p in model.named_parameters()}
    out["initialize_calls"] = len(built)

    with pytest.raises(ValueError, match="unknown parameter names"):
        backend.prepare(model, ["blocks.9.fc1.weight"])
    with pytest.raises(ValueError, match="requires_grad=False when the ZeRO-3 engine"):
        backend.prepare(model, ["head.bias"])
    with pytest.raises(ValueError, match="already wraps another model"):
        backend.prepare(build_model(), STAGE1)
    return out


def reference(edit: bool):
    """One process, the whole batch: per-rank chunk losses and full gradients."""
    model = build_model()
    if edit:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in STAGE1:
                    p.view(-1)[edit_mask(0, p.numel())] *= 0.1
    x, y = global_batch()
    loss_of(model, x, y).backward()
    with torch.no_grad():
        chunk_losses = [loss_of(model, xc, yc).item() for xc, yc in zip(x.chunk(WORLD), y.chunk(WORLD))]
    return model, chunk_losses, {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(probe_ranks, WORLD, timeout=240, env=ENV)


def expected_slice(numel: int, rank: int) -> tuple[int, int]:
    part = -(-numel // WORLD)  # ZeRO-3: equal parts of the padded size
    return min(rank * part, numel), min((rank + 1) * part, numel)


def test_local_slices_are_the_unpadded_flat_partitions(ranks):
    model = build_model()
    params = dict(model.named_parameters())
    for rank, out in enumerate(ranks):
        for n in STAGE1:
            s = out["slices"][n]
            assert (s.layout, tuple(s.full_shape)) == ("flat", tuple(params[n].shape))
            assert (s.start, s.stop) == expected_slice(params[n].numel(), rank)
            assert out["weights"][n].shape == (s.stop - s.start,)
            np.testing.assert_array_equal(out["weights"][n], params[n].detach().flatten()[s.start:s.stop].numpy())
    assert ranks[1]["slices"]["scale"].stop == ranks[1]["slices"]["scale"].start  # empty slice


def test_local_grads_are_rank_averaged_slices_of_the_reference(ranks):
    _, _, ref = reference(edit=False)
    for out in ranks:
        for n in STAGE1:
            s = out["slices"][n]
            want = ref[n].flatten()[s.start:s.stop].numpy()
            np.testing.assert_allclose(out["grads0"][n], want, atol=1e-6, rtol=0)
            np.testing.assert_array_equal(out["grads_again"][n], out["grads0"][n])  # zero_grad: no accumulation
        assert out["grads0"]["blocks.0.fc1.bias"] is None  # frozen by prepare
        assert out["grad_after_zero"] is None


def test_edit_and_commit_reach_the_next_forward_and_restore_bit_exactly(ranks):
    _, ref_losses, ref_grads = reference(edit=True)
    for rank, out in enumerate(ranks):
        assert out["loss_edit"] != out["loss0"]
        assert out["loss_edit"] == pytest.approx(ref_losses[rank], abs=1e-6)
        for n in STAGE1:
            s = out["slices"][n]
            want = ref_grads[n].flatten()[s.start:s.stop].numpy()
            np.testing.assert_allclose(out["grads_edit"][n], want, atol=1e-6, rtol=0)
            np.testing.assert_array_equal(out["grads_restored"][n], out["grads0"][n])
        assert out["loss_restored"] == out["loss0"]


def test_gather_and_scatter_round_trip(ranks):
    model, _, ref_grads = reference(edit=False)
    params = dict(model.named_parameters())
    for n in STAGE1:
        np.testing.assert_array_equal(ranks[0]["gathered"][n], params[n].detach().numpy())
        assert ranks[1]["gathered"][n] is None
        for out in ranks:
            np.testing.assert_array_equal(out["scattered"][n], out["weights"][n])
            assert out["numel_sum"][n] == params[n].numel()
    np.testing.assert_allclose(ranks[0]["gathered_grad"], ref_grads["blocks.0.fc1.weight"].numpy(), atol=1e-6, rtol=0)


def test_collectives(ranks):
    for out in ranks:
        assert (out["max_rank"], out["min_rank"]) == (WORLD - 1, 0)
        assert out["broadcast"] == {"from": 0}


def test_second_prepare_reuses_the_engine_and_release_restores_flags(ranks):
    _, _, ref = reference(edit=False)
    originally = {n: p.requires_grad for n, p in build_model().named_parameters()}
    for rank, out in enumerate(ranks):
        assert out["same_engine"] and out["initialize_calls"] == 1
        assert out["flags_stage1"] == {n: n in STAGE1 for n in originally}
        assert out["flags_stage2"] == {n: n in STAGE2 for n in originally}
        assert out["flags_released"] == originally
        for n in STAGE2:
            s = expected_slice(ref[n].numel(), rank)
            np.testing.assert_allclose(out["grads_stage2"][n], ref[n].flatten()[s[0]:s[1]].numpy(), atol=1e-6, rtol=0)
        assert out["grads_stage2"]["blocks.0.fc1.weight"] is None


def test_constructor_needs_a_process_group_and_a_valid_batch_size():
    from gradprobe_dist.parallel.zero3 import Zero3Backend

    with pytest.raises(ValueError, match="micro_batch_size"):
        Zero3Backend(micro_batch_size=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        Zero3Backend()
