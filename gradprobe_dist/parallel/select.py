"""Exact k-smallest selection over tensors sharded across ranks, without gathering them.

Why: a pruning threshold over FSDP / ZeRO-3 shards must be exact and identical on every
rank, yet gathering billions of scores onto one rank does not fit. A radix select over the
order-preserving integer key of each float32 value finds the exact k-th smallest with four
rounds of a 256-bin histogram summed over ranks (one ``all_reduce`` per round, batched over
all tensors); one ``all_gather`` of tie counts then decides which equal values are taken.
Selection groups of at most ``GATHER_LIMIT`` values over all ranks (one layer's candidates,
SparseGPT's per-block tiles) are cheaper gathered, as many groups per ``all_gather`` as fit
in the limit: every rank gets their values and selects locally, with the same result.

Order used everywhere: values compare as float32 (so ``-0.0 == 0.0``); among equal values
the lowest (tensor index, rank, flat index) comes first. That is the global order when
rank r holds the r-th contiguous piece of every tensor, so the masks equal those of one
process holding the concatenation. Every rank must pass the same number of tensors and
the same ``k``. The collectives are the caller's (a backend's ``Collectives``); without
them (``None``: one process, or tensors replicated on every rank) everything runs locally.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gradprobe_dist.probe.validation import is_int

_DIGIT_BITS = 8
_BINS = 1 << _DIGIT_BITS
_KEY_BITS = 32
_SHIFTS = tuple(range(_KEY_BITS - _DIGIT_BITS, -1, -_DIGIT_BITS))  # 24, 16, 8, 0: top digit first
_SIGN = 1 << 31
_MASK32 = (1 << 32) - 1
#: at most this many values over all ranks (16 MiB of float32) are gathered to every rank
#: and selected there: one ``all_gather`` instead of the five radix rounds
GATHER_LIMIT = 1 << 22


# -- float32 <-> order-preserving key ------------------------------------------------------
def _sortable_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) whose integer order is the float32 order of ``values``.

    Negative floats have their bits flipped (larger magnitude -> smaller key), positive
    floats get the sign bit set; ``-0.0`` is first turned into ``+0.0`` so both tie.
    """
    as_float = values.detach().reshape(-1).to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = as_float.view(torch.int32).to(torch.int64) & _MASK32
    return torch.where(bits >= _SIGN, _MASK32 - bits, bits + _SIGN)


# -- input checks ---------------------------------------------------------------------------
def _check_tensors(scores: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    scores = list(scores)
    for i, tensor in enumerate(scores):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(tensor).__name__}; pass torch.Tensor values")
        if not tensor.is_floating_point():
            raise TypeError(f"{what}[{i}] has dtype {tensor.dtype}; pass a floating tensor "
                            f"(e.g. scores.float())")
    return scores


def _check_k(k, name: str) -> int:
    if not is_int(k):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}; pass int({name})")
    if k < 0:
        raise ValueError(f"{name}={k} is negative; pass a count between 0 and the number of values")
    return k


def _nothing_to_select(k: int, name: str) -> list[torch.Tensor]:
    """No tensors on any rank (every rank passes the same number): only k=0 makes sense."""
    if k:
        raise ValueError(f"{name}={k} but no score tensors were passed; pass k=0 or some scores")
    return []


# -- the radix select -----------------------------------------------------------------------
def _radix_select(scores: list[torch.Tensor], owner: list[int], ks: list[int], labels: list[str],
                  collectives):
    """Exact k-th smallest key of each selection group, summed over ranks.

    ``owner[i]`` is the group of ``scores[i]``; group g asks for its ``ks[g]``-th smallest
    (``ks[g] == 0`` selects nothing); ``labels[g]`` names it in errors. Returns ``(target_key, ties_needed)`` per group: the
    k-th smallest key and how many values equal to it belong to the k smallest. Keys are
    recomputed per tensor and round so extra memory stays bounded by the largest tensor.
    """
    n_groups = len(ks)
    device = scores[0].device  # where the collectives run (cuda under nccl)
    remaining = torch.tensor(ks, dtype=torch.int64, device=device)
    prefix = torch.zeros(n_groups, dtype=torch.int64, device=device)
    for round_index, shift in enumerate(_SHIFTS):
        # Column _BINS carries NaN counts in the first round so every rank raises together.
        hist = torch.zeros(n_groups, _BINS + 1, dtype=torch.int64, device=device)
        for tensor, g in zip(scores, owner):
            key = _sortable_key(tensor)
            key = key[(key >> (shift + _DIGIT_BITS)) == prefix[g]]
            hist[g, :_BINS] += torch.bincount((key >> shift) & (_BINS - 1), minlength=_BINS)
            if round_index == 0:
                hist[g, _BINS] += torch.isnan(tensor).sum()
        collectives.all_reduce(hist, "sum")
        if round_index == 0:
            _raise_on_bad_counts(hist[:, _BINS].tolist(), hist[:, :_BINS].sum(1).tolist(), ks, labels)
        hist = hist[:, :_BINS]
        cumulative = hist.cumsum(1)
        digit = (cumulative < remaining[:, None]).sum(1).clamp_(max=_BINS - 1)
        below_digit = (cumulative - hist).gather(1, digit[:, None]).squeeze(1)
        remaining -= below_digit
        prefix = (prefix << _DIGIT_BITS) | digit
    return prefix, remaining


def _raise_on_bad_counts(nan_counts: list[int], totals: list[int], ks: list[int],
                         labels: list[str]) -> None:
    for nans, total, k, label in zip(nan_counts, totals, ks, labels):
        if nans:
            raise ValueError(f"{label} hold {nans} NaN values over all ranks; replace them "
                             f"(e.g. torch.nan_to_num) before selecting")
        if k > total:
            raise ValueError(f"k={k} values asked of {label}, which hold only {total} over all "
                             f"ranks; pass k between 0 and {total}")


def _tie_broken_masks(scores: list[torch.Tensor], owner: list[int], target, ties_needed,
                      collectives) -> list[torch.Tensor]:
    """Mark values below their group's target key, plus the first ``ties_needed`` values equal
    to it in (tensor index, rank, flat index) order."""
    rank, world = collectives.rank, collectives.world_size
    tie_counts = torch.stack([(_sortable_key(t) == target[g]).sum() for t, g in zip(scores, owner)])
    # Exclusive prefix over (tensor, rank), restarted at each group's first tensor.
    by_tensor_then_rank = collectives.all_gather(tie_counts).T.reshape(-1)
    ties_before = by_tensor_then_rank.cumsum(0) - by_tensor_then_rank
    first_tensor = {}
    for i, g in enumerate(owner):
        first_tensor.setdefault(g, i)
    masks = []
    for i, (tensor, g) in enumerate(zip(scores, owner)):
        key = _sortable_key(tensor)
        tie = key == target[g]
        earlier_ties = ties_before[i * world + rank] - ties_before[first_tensor[g] * world]
        tie_order = earlier_ties + tie.cumsum(0) - 1
        mask = (key < target[g]) | (tie & (tie_order < ties_needed[g]))
        masks.append(mask.reshape(tensor.shape))
    return masks


def with_first_ties(below: torch.Tensor, tie: torch.Tensor, needed, dim: int = -1) -> torch.Tensor:
    """``below`` completed by the first ``needed`` ``tie`` entries along ``dim`` (``needed``
    an int, or one count per slice with ``dim`` kept): all of them, without the cumsum, when
    no slice has ties to spare (the usual case with continuous scores)."""
    if bool((tie.count_nonzero(dim=dim).unsqueeze(dim) <= needed).all()):
        return below | tie
    return below | (tie & (tie.cumsum(dim) <= needed))


def _local_masks(scores: list[torch.Tensor], k: int, label: str) -> list[torch.Tensor]:
    """The same rule in one process, without radix rounds: one ``kthvalue`` over the
    concatenation, then the first ties in flat order (several times cheaper than the keys)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in scores]).add_(0.0)  # a copy: -0.0 -> +0.0
    nans = int(torch.isnan(flat).count_nonzero())
    _raise_on_bad_counts([nans], [flat.numel()], [k], [label])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        kth = torch.kthvalue(flat, k).values
        below = flat < kth
        mask = with_first_ties(below, flat == kth, k - int(below.count_nonzero()))
    return [m.reshape(t.shape) for m, t in zip(mask.split([t.numel() for t in scores]), scores)]


def _gathered_masks(scores: list[torch.Tensor], owner: list[int], ks: list[int], labels: list[str],
                   sizes: torch.Tensor, collectives) -> list[torch.Tensor]:
    """The radix select's result from every rank's values gathered: group g's values in
    (tensor index, rank, flat index) order, selected by ``_local_masks`` on every rank.
    ``sizes [world, len(scores)]``: every rank's numel of each tensor."""
    rank, world = collectives.rank, collectives.world_size
    totals = sizes.sum(1).tolist()
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in scores])
    padded = flat.new_zeros(max(totals))
    padded[:flat.numel()] = flat
    everyone = collectives.all_gather(padded) if max(totals) else padded.expand(world, 0)
    pieces = [everyone[r, :totals[r]].split(sizes[r].tolist()) for r in range(world)]
    masks: list[torch.Tensor | None] = [None] * len(scores)
    for g, k in enumerate(ks):
        members = [i for i, o in enumerate(owner) if o == g]
        picked = _local_masks([pieces[r][i] for i in members for r in range(world)], k, labels[g])
        for j, i in enumerate(members):
            masks[i] = picked[j * world + rank].reshape(scores[i].shape)
    return masks


def _gather_chunks(group_totals: list[int], gather_limit: int) -> tuple[list[list[int]], list[int]]:
    """Groups (in order) packed into chunks of at most ``gather_limit`` values each, and the
    groups too large for any chunk."""
    chunks: list[list[int]] = []
    large: list[int] = []
    filled = 0
    for g, total in enumerate(group_totals):
        if total > gather_limit:
            large.append(g)
            continue
        if not chunks or filled + total > gather_limit:
            chunks.append([])
            filled = 0
        chunks[-1].append(g)
        filled += total
    return chunks, large


def selection_groups(totals: Sequence[int], gather_limit: int = GATHER_LIMIT) -> list[list[int]]:
    """Indices of tensors with ``totals`` values over all ranks, grouped as
    ``select_smallest_each`` gathers them (each larger one alone): a caller that makes its
    scores group by group, one call each, holds one group's scores at a time."""
    chunks, large = _gather_chunks(list(totals), gather_limit)
    return chunks + [[i] for i in large]


def _select(scores: list[torch.Tensor], owner: list[int], ks: list[int], labels: list[str],
            collectives, gather_limit: int) -> list[torch.Tensor]:
    """Groups of at most ``gather_limit`` values over all ranks are gathered, as many groups
    per ``all_gather`` as fit in that limit (a layer-by-layer selection of a deep model
    takes a few gathers, not five rounds over every value); larger groups go through the
    radix select together. The same partition on every rank: it depends on global sizes."""
    sizes = collectives.all_gather(torch.tensor([t.numel() for t in scores], dtype=torch.int64,
                                                device=scores[0].device))
    members: list[list[int]] = [[] for _ in ks]
    for i, g in enumerate(owner):
        members[g].append(i)
    chunks, large = _gather_chunks([int(sizes[:, idx].sum()) for idx in members], gather_limit)
    masks: list[torch.Tensor | None] = [None] * len(scores)

    def gathered(idx, sub_owner, sub_ks, sub_labels):
        return _gathered_masks([scores[i] for i in idx], sub_owner, sub_ks, sub_labels, sizes[:, idx], collectives)

    def radix(idx, sub_owner, sub_ks, sub_labels):
        sub_scores = [scores[i] for i in idx]
        target, ties_needed = _radix_select(sub_scores, sub_owner, sub_ks, sub_labels, collectives)
        return _tie_broken_masks(sub_scores, sub_owner, target, ties_needed, collectives)

    for groups, select in [*((chunk, gathered) for chunk in chunks), *([(large, radix)] if large else [])]:
        idx = [i for g in groups for i in members[g]]
        sub_owner = [j for j, g in enumerate(groups) for _ in members[g]]
        picked = select(idx, sub_owner, [ks[g] for g in groups], [labels[g] for g in groups])
        for i, mask in zip(idx, picked):
            masks[i] = mask
    return masks


# -- public API -----------------------------------------------------------------------------
def select_smallest(scores: Sequence[torch.Tensor], k: int, collectives=None,
                    gather_limit: int = GATHER_LIMIT) -> list[torch.Tensor]:
    """Bool masks (shaped like ``scores``) marking the k smallest values over all tensors and
    all ranks together, ties to the lowest (tensor index, rank, flat index). A collective:
    two collective calls (sizes, values) up to ``gather_limit`` values over all ranks, six
    above it, whatever the number of tensors."""
    scores = _check_tensors(scores, "scores")
    k = _check_k(k, "k")
    if not scores:
        return _nothing_to_select(k, "k")
    if collectives is None:
        return _local_masks(scores, k, "scores")
    return _select(scores, [0] * len(scores), [k], ["scores"], collectives, gather_limit)


def select_smallest_each(scores: Sequence[torch.Tensor], ks: Sequence[int], collectives=None,
                         gather_limit: int = GATHER_LIMIT) -> list[torch.Tensor]:
    """For each tensor i on its own, a bool mask of its ``ks[i]`` smallest values over all
    ranks (ties to the lowest rank, then flat index). A collective whose calls cover many
    tensors at once, so per-layer selection of a deep model stays cheap: one ``all_gather``
    of sizes, then one per ``gather_limit`` values of tensors under that limit, plus five
    for all the larger ones together."""
    scores = _check_tensors(scores, "scores")
    ks = [_check_k(k, f"ks[{i}]") for i, k in enumerate(ks)]
    if len(ks) != len(scores):
        raise ValueError(f"got {len(scores)} score tensors but {len(ks)} counts; pass one k per tensor")
    if not scores:
        return []
    if collectives is None:
        return [_local_masks([t], k, f"scores[{i}]")[0] for i, (t, k) in enumerate(zip(scores, ks))]
    owner = list(range(len(scores)))
    return _select(scores, owner, ks, [f"scores[{i}]" for i in owner], collectives, gather_limit)
