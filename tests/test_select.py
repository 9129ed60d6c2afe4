"""Exact distributed k-smallest selection: real gloo ranks against one process on the
concatenation, which is the reference rule (stable sort by value, then flat index)."""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from multiproc import run_ranks  # noqa: E402
from references import kth_smallest, select_smallest, select_smallest_each  # noqa: E402

from gradprobe_dist.parallel.select import GATHER_LIMIT  # noqa: E402


# -- data and reference --------------------------------------------------------------------
def _tied_values(n: int, seed: int) -> torch.Tensor:
    """Heavy ties, negatives, +0.0 and -0.0 mixed, a few infinities and tiny values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-4, 5, (n,), generator=g).float() * 0.25
    zeros = values == 0
    values[zeros] = torch.where(torch.rand(int(zeros.sum()), generator=g) < 0.5, -0.0, 0.0)
    special = torch.tensor([float("-inf"), float("inf"), 1e-45, -1e-45, -3.0e38])
    picks = torch.randperm(n, generator=g)[: len(special)]
    values[picks] = special[: len(picks)]
    return values


def _model_scores(seed: int) -> list[torch.Tensor]:
    """Tensors of uneven sizes (one empty, some smaller than the world) and shapes."""
    shapes = [(7, 5), (3,), (0,), (2, 1), (13, 4), (1,)]
    return [_tied_values(int(torch.Size(s).numel()), seed + i).reshape(s) for i, s in enumerate(shapes)]


def _piece(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's contiguous r-th piece of the flattened tensor (uneven, possibly empty)."""
    return torch.tensor_split(tensor.reshape(-1), world)[rank]


def _reference_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.sort(values.reshape(-1), stable=True).indices[:k]] = True
    return mask.reshape(values.shape)


# -- rank functions (module level so spawned ranks can import them) -------------------------
_KTH_SIZES = (9, 0, 23)  # rank 1 holds nothing


def _kth_on_ranks(rank, world, gather_limit):
    values = torch.tensor_split(_tied_values(sum(_KTH_SIZES), seed=3), [9, 9])[rank]
    total = sum(_KTH_SIZES)
    answers = {k: kth_smallest(values, k, gather_limit) for k in (1, 2, 5, total // 2, total - 1, total)}
    answers["bf16"] = kth_smallest(values.to(torch.bfloat16), 7, gather_limit)
    errors = {}
    for name, call in {
        "nan": lambda: kth_smallest(torch.full((2,), float("nan")) if rank == 2 else values, 1, gather_limit),
        "too_big": lambda: kth_smallest(values, total + 1, gather_limit),
    }.items():
        try:
            call()
        except ValueError as error:
            errors[name] = str(error)
    return answers, errors


def _select_on_ranks(rank, world, k_total, ks, gather_limit):
    pieces = [_piece(t, rank, world) for t in _model_scores(seed=11)]
    return select_smallest(pieces, k_total, gather_limit), select_smallest_each(pieces, ks, gather_limit)


def _count_collectives(rank, world):
    import torch.distributed as dist

    calls = {"n": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    dist.all_reduce, dist.all_gather = counted(dist.all_reduce), counted(dist.all_gather)
    counts = {}
    for gather_limit in (0, GATHER_LIMIT):
        for n_tensors in (2, 60):
            scores = [_piece(_tied_values(17, seed=i), rank, world) for i in range(n_tensors)]
            calls["n"] = 0
            masks = select_smallest_each(scores, [5] * n_tensors, gather_limit)
            counts[gather_limit, n_tensors] = (calls["n"], sum(int(m.sum()) for m in masks))
    return counts


# -- distributed tests ---------------------------------------------------------------------
@pytest.mark.parametrize("gather_limit", [0, GATHER_LIMIT], ids=["radix", "gathered"])
def test_kth_smallest_matches_kthvalue_on_three_uneven_ranks(gather_limit):
    total = sum(_KTH_SIZES)
    everything = _tied_values(total, seed=3)
    results = run_ranks(_kth_on_ranks, 3, gather_limit, timeout=120)
    answers, errors = results[0]
    assert all(r[0] == answers for r in results), "ranks disagree on the k-th value"
    for k, value in answers.items():
        if k == "bf16":
            assert value == torch.kthvalue(everything.to(torch.bfloat16).float(), 7).values.item()
        else:
            assert value == torch.kthvalue(everything, k).values.item(), k
    for _, rank_errors in results:  # every rank raises, not only the one holding the NaN
        assert "NaN" in rank_errors["nan"] and "nan_to_num" in rank_errors["nan"]
        assert f"k={total + 1}" in rank_errors["too_big"]


# 40 values: the layers of 35, 3, 0 and 2 values share one gather, the 52 go radix, the 1 is
# gathered alone (a second chunk)
@pytest.mark.parametrize("gather_limit", [0, GATHER_LIMIT, 40], ids=["radix", "gathered", "chunks and radix"])
@pytest.mark.parametrize("world", [2, 3])
def test_selection_equals_one_process_on_the_concatenation(world, gather_limit):
    full = _model_scores(seed=11)
    total = sum(t.numel() for t in full)
    k_total = total // 3
    ks = [t.numel() // 2 for t in full]
    ks[-1] = full[-1].numel()  # all of it
    results = run_ranks(_select_on_ranks, world, k_total, ks, gather_limit, timeout=120)

    joined = [[torch.cat([r[which][i].reshape(-1) for r in results]) for i in range(len(full))]
              for which in (0, 1)]
    together, each = joined
    expected_together = _reference_mask(torch.cat([t.reshape(-1) for t in full]), k_total)
    assert int(torch.cat(together).sum()) == k_total
    assert torch.equal(torch.cat(together), expected_together)
    for i, tensor in enumerate(full):
        assert int(each[i].sum()) == ks[i]
        assert torch.equal(each[i], _reference_mask(tensor, ks[i]).reshape(-1)), i
    for r, (masks, _) in enumerate(results):  # local masks keep the local shapes
        assert [m.shape for m in masks] == [_piece(t, r, world).shape for t in full]


def test_collectives_of_select_each_do_not_grow_with_the_tensor_count():
    per_rank = run_ranks(_count_collectives, 2, timeout=120)
    for counts in per_rank:
        assert counts[0, 2][0] == counts[0, 60][0] == 6  # sizes, 4 radix rounds, tie counts
        assert counts[GATHER_LIMIT, 2][0] == counts[GATHER_LIMIT, 60][0] == 2  # sizes, values
    for key in per_rank[0]:
        assert sum(counts[key][1] for counts in per_rank) == key[1] * 5


# -- single process (no process group) -----------------------------------------------------
def test_single_process_matches_sort_and_kthvalue():
    for seed in range(20):
        values = _tied_values(40, seed)
        for k in (1, 7, 20, 40):
            assert kth_smallest(values, k) == torch.kthvalue(values, k).values.item()
        parts = list(torch.tensor_split(values, [10, 10, 31]))  # includes an empty tensor
        together = select_smallest(parts, 17)
        assert torch.equal(torch.cat(together), _reference_mask(values, 17))
        ks = [3, 0, 21, 9]  # parts hold 10, 0, 21 and 9 values
        for part, k, mask in zip(parts, ks, select_smallest_each(parts, ks)):
            assert torch.equal(mask, _reference_mask(part, k))


def test_negative_zero_ties_with_zero_in_index_order():
    values = torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0])
    assert select_smallest([values], 3)[0].tolist() == [True, True, False, False, True]
    assert kth_smallest(values, 2) == 0.0


def test_float64_inputs_compare_as_float32():
    values = torch.tensor([1.0, 1.0 + 1e-12, 0.5], dtype=torch.float64)  # equal in float32
    assert select_smallest([values], 2)[0].tolist() == [True, False, True]


def test_edge_counts_and_shapes():
    matrix = torch.arange(12.0).reshape(3, 4).flip(1)
    assert not select_smallest([matrix], 0)[0].any()
    assert select_smallest([matrix], 12)[0].all()
    assert select_smallest([], 0) == []
    assert select_smallest_each([], []) == []
    assert select_smallest([torch.empty(0)], 0)[0].shape == (0,)


@pytest.mark.parametrize("call, error, words", [
    (lambda: kth_smallest(torch.tensor([1.0, float("nan")]), 1), ValueError, "NaN"),
    (lambda: select_smallest([torch.tensor([float("nan")])], 0), ValueError, "nan_to_num"),
    (lambda: kth_smallest(torch.ones(3), 0), ValueError, "between 1 and"),
    (lambda: kth_smallest(torch.ones(3), 4), ValueError, "between 0 and 3"),
    (lambda: select_smallest([torch.ones(3)], -1), ValueError, "negative"),
    (lambda: select_smallest([], 2), ValueError, "no score tensors"),
    (lambda: select_smallest([torch.ones(2, dtype=torch.int64)], 1), TypeError, ".float()"),
    (lambda: select_smallest([[1.0, 2.0]], 1), TypeError, "torch.Tensor"),
    (lambda: select_smallest([torch.ones(2)], 1.0), TypeError, "int(k)"),
    (lambda: select_smallest_each([torch.ones(2), torch.ones(3)], [1]), ValueError, "one k per tensor"),
    (lambda: select_smallest_each([torch.ones(1), torch.ones(2)], [1, 3]), ValueError,
     "scores[1], which hold only 2"),
])
def test_bad_input_errors_name_the_problem_and_fix(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()


def test_gather_chunks_pack_groups_in_order_up_to_the_limit():
    from gradprobe_dist.parallel.select import _gather_chunks

    assert _gather_chunks([35, 3, 0, 2, 52, 1], 40) == ([[0, 1, 2, 3], [5]], [4])
    assert _gather_chunks([10, 10, 10], 20) == ([[0, 1], [2]], [])
    assert _gather_chunks([5, 5], 0) == ([], [0, 1])
    assert _gather_chunks([], 40) == ([], [])


def test_selection_groups_are_the_gather_chunks_then_each_larger_tensor_alone():
    from gradprobe_dist.parallel.select import selection_groups

    assert selection_groups([35, 3, 0, 2, 52, 1, 41], 40) == [[0, 1, 2, 3], [5], [4], [6]]
    assert selection_groups([]) == []
