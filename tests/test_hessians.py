"""Input Hessians: layers fed one tensor share a matrix; averaged over real gloo ranks, each
matrix lives on one owner rank only (owners balanced by size), and ``fetch`` brings every
rank the matrix one process gets from all the ranks' inputs; ``invert`` factors each matrix
once, on its owner, into exactly what a sweep would compute from it. Matrices are kept as
their lower triangle, which factors exactly as the whole matrix."""
import pytest
import torch
import torch.nn as nn

from gradprobe_dist.parallel import build_backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.reconstruct.hessians import (Hessians, as_hessians, average_over_ranks, balanced_owners,
                                                 collect_input_hessians)
from gradprobe_dist.reconstruct import hessians as hessians_module
from gradprobe_dist.reconstruct.obs import InverseFactor, accumulate_hessian, inverse_factor
from gradprobe_dist.reconstruct.triangle import pack_lower, side, unpack_lower, unpack_symmetric
from multiproc import run_ranks


class Block(nn.Module):
    """q/k read one tensor (one shared matrix), ``up`` a wider one, ``out`` a third."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.up, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.q(x) + self.k(x))
        return self.out(torch.relu(self.up(h)))


def _batches(rank=0, world=1):
    """4 batches of 8 rows (rank r: its r-th share of each; rank 1's shares are uneven)."""
    g = torch.Generator().manual_seed(1)
    cuts = [0, 8] if world == 1 else [0, 3, 8]
    return [x[cuts[rank]:cuts[rank + 1]] for x in (torch.randn(8, 6, generator=g) for _ in range(4))]


def _collect(block, batches):
    owners = {"q": block.q, "k": block.k, "up": block.up, "out": block.out}
    with torch.no_grad(), collect_input_hessians(owners) as local:
        for x in batches:
            block(x)
    return local


def test_layers_fed_the_same_input_share_one_hessian():
    """q/k reading one tensor share a single entry (folded once), with the matrix each would
    get alone; a layer fed another tensor keeps its own."""
    block, batches = Block(), _batches()
    local = _collect(block, batches)
    assert local["q"] is local["k"] and local["q"] is not local["up"]
    hessians = average_over_ranks(local, LocalBackend())
    q, k, up = hessians.fetch(["q", "k", "up"])
    assert q is k and q is not up
    alone, seen = torch.zeros(6, 6), 0
    for x in batches:
        seen = accumulate_hessian(alone, x, seen)
    torch.testing.assert_close(q, alone)


def test_owners_are_balanced_by_size():
    """Largest first to the least-loaded rank: a LLaMA-like block's large down_proj matrix
    does not land on the same rank block after block (round-robin would put all on rank 0)."""
    sizes = [9, 1, 1, 1] * 6  # per block: down_proj, gate/up, o, q/k/v
    owners = balanced_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert loads == [36, 36]
    assert sorted(set(owners[::4])) == [0, 1]
    assert balanced_owners([5, 5, 5], 1) == [0, 0, 0]
    assert balanced_owners([3, 2, 2], 3) == [0, 1, 2]


def _ranked(rank, world):
    backend = build_backend("ddp", torch.device("cpu"))  # its collectives; no model needed
    hessians = average_over_ranks(_collect(Block(), _batches(rank, world)), backend)
    return hessians.held_bytes(), {n: t.clone() for n, t in zip(hessians, hessians.fetch(list(hessians)))}


def test_two_ranks_hold_each_matrix_once_and_fetch_the_global_mean():
    (held0, got0), (held1, got1) = (run_ranks(_ranked, 2)[r] for r in range(2))
    reference = average_over_ranks(_collect(Block(), _batches()), LocalBackend())
    total = reference.held_bytes()
    assert total == 4 * (21 + 136 + 21)  # 3 matrices for 4 layers, each once, as lower triangles
    assert held0 + held1 == total and 0 < held0 < total and 0 < held1 < total
    for name, H in zip(reference, reference.fetch(list(reference))):
        torch.testing.assert_close(got0[name], H, msg=lambda m: f"rank 0 {name}: {m}")
        assert torch.equal(got0[name], got1[name]), name


def test_a_plain_mapping_is_taken_as_replicated():
    H = torch.eye(3)
    hessians = as_hessians({"b": H, "a": 2 * H})
    assert list(hessians) == ["a", "b"] and "b" in hessians and len(hessians) == 2
    assert hessians.fetch(["b"])[0] is H
    assert as_hessians(hessians) is hessians and isinstance(hessians, Hessians)



def _inverted(rank, world, not_definite):
    """On each rank: what it would factor itself from the fetched matrices, then ``invert``
    (counting the factorizations this rank does) and what ``fetch`` brings afterwards."""
    backend = build_backend("ddp", torch.device("cpu"))
    local = _collect(Block(), _batches(rank, world))
    if not_definite:
        local["up"][0].neg_()
    hessians = average_over_ranks(local, backend)
    names = list(hessians)
    own = {} if not_definite else {n: inverse_factor(H, 0.01) for n, H in zip(names, hessians.fetch(names))}
    calls, factor = [], hessians_module.inverse_factor
    hessians_module.inverse_factor = lambda H, percdamp: calls.append(H.shape[0]) or factor(H, percdamp)
    try:
        hessians.invert(0.01)
    except ValueError as error:
        return str(error)
    hessians.invert(0.01)  # a second sweep's call (the guard's): nothing redone
    return sorted(calls), {n: torch.equal(f.hinv, own[n].hinv) and torch.equal(f.dead, own[n].dead)
                           for n, f in zip(names, hessians.fetch(names))}


def test_invert_factors_each_matrix_once_on_its_owner_bit_exactly():
    (calls0, same0), (calls1, same1) = run_ranks(_inverted, 2, False)
    assert sorted(calls0 + calls1) == [6, 6, 16]  # 3 matrices (q/k share one), each factored once
    assert calls0 and calls1  # both ranks factor, in parallel
    assert all(same0.values()) and all(same1.values()) and set(same0) == {"q", "k", "up", "out"}


def test_a_matrix_that_will_not_factor_raises_on_every_rank():
    for error in run_ranks(_inverted, 2, True):  # only the owner of "up" fails to factor it
        assert "not positive definite" in error and "percdamp" in error


def test_invert_keeps_its_damping_and_a_factor_sweeps_as_its_matrix():
    from gradprobe_dist.reconstruct.sparsegpt import sparsegpt_layers

    block, batches = Block(), _batches()
    hessians = average_over_ranks(_collect(block, batches), LocalBackend())
    (H,) = hessians.fetch(["up"])
    H = H.clone()
    hessians.invert(0.01)
    (factor,) = hessians.fetch(["up"])
    assert isinstance(factor, InverseFactor) and factor.percdamp == 0.01
    with pytest.raises(ValueError, match="inverted with percdamp=0.01"):
        hessians.invert(0.05)
    W = block.up.weight.detach()
    (from_matrix, mask_m), = sparsegpt_layers([W], [H], 0.5, blocksize=4)
    (from_factor, mask_f), = sparsegpt_layers([W], [factor], 0.5, blocksize=4)
    assert torch.equal(from_matrix, from_factor) and torch.equal(mask_m, mask_f) and mask_m.any()
    with pytest.raises(ValueError, match="inverted with percdamp=0.01"):
        sparsegpt_layers([W], [factor], 0.5, blocksize=4, percdamp=0.1)


def test_a_packed_triangle_rebuilds_its_matrix_and_factors_bit_exactly():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 9, generator=g)
    H = 2 * X.T @ X / 40
    H = H + torch.triu(torch.randn(9, 9, generator=g) * 1e-6, 1)  # an upper triangle a gemm rounded apart
    packed = pack_lower(H)
    assert packed.shape == (45,) and side(packed) == 9
    assert torch.equal(unpack_lower(packed), H.tril())
    rebuilt = unpack_symmetric(packed)
    assert torch.equal(rebuilt, rebuilt.T) and torch.equal(rebuilt.tril(), H.tril())
    # Cholesky reads the lower triangle only: the factor is the whole matrix's, bit for bit
    assert torch.equal(inverse_factor(rebuilt, 0.01).lower, inverse_factor(H, 0.01).lower)
    with pytest.raises(ValueError, match="n\\(n\\+1\\)/2"):
        side(torch.zeros(44))


def test_packed_accumulation_keeps_the_lower_triangle_of_the_running_mean():
    batches = _batches()
    whole, packed, seen_w, seen_p = torch.zeros(6, 6), torch.zeros(21), 0, 0
    for x in batches:
        seen_w = accumulate_hessian(whole, x, seen_w)
        seen_p = accumulate_hessian(packed, x, seen_p)
    assert seen_w == seen_p == 32
    torch.testing.assert_close(unpack_symmetric(packed), whole)
    local = _collect(Block(), batches)
    assert local["up"][0].shape == (21,) and local["out"][0].shape == (136,)  # what a rank holds
    with pytest.raises(ValueError, match="does not fit"):
        accumulate_hessian(torch.zeros(20), batches[0], 0)
