"""Every Linear layer's input Hessian ``H = 2 X X^T``: collected by forward hooks, averaged
over ranks, and then held whole by one *owner* rank per matrix.

SparseGPT and the OBS update need a layer's whole ``[in, in]`` H on every rank that sweeps
its rows, but only while that layer is swept; a rank keeping every matrix would hold all
of a stage's Hessians at once (about 400 MiB for SmolLM2-135M, 32 GB for a LLaMA-8B, as
whole matrices) on every rank. So the averaging sums each matrix onto its owner (owners
balanced by size) and the others drop their copy; the sweeps ``fetch`` a few at a time,
broadcast from the owners. A sweep needs only each matrix's damped inverse factor
(``obs.inverse_factor``), so ``invert`` has each owner replace its matrices by theirs,
once, the ranks in parallel, rather than every rank factoring every matrix in every sweep
(the guard sweeps twice). Both are kept and sent as their lower triangle (``triangle``):
half the memory and traffic.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.params import transposed_linear_types
from gradprobe_dist.reconstruct.obs import InverseFactor, accumulate_hessian, inverse_factor
from gradprobe_dist.reconstruct.triangle import pack_lower, packed_size, side, unpack_lower, unpack_symmetric


@contextmanager
def collect_input_hessians(owners: dict[str, nn.Module]):
    """Yield name -> [H, n_seen] running means of 2 x x^T for every Linear layer in ``owners``
    (``nn.Linear`` and GPT-2's transposed ``Conv1D``, whose input is ``[..., in]`` too), each
    H packed as its lower triangle (``triangle.unpack_symmetric`` gives the matrix).

    Layers fed the very same input tensor (a LLaMA block's q/k/v, its gate/up) share one
    entry, folded once: the same matrices, at 4 instead of 7 per block."""
    hessians: dict[str, list] = {}
    handles = []
    last: dict = {"input": None, "entry": None}  # the input folded most recently, and where

    def make_hook(name: str):
        def hook(module, inputs):
            if inputs[0] is last["input"] and hessians.setdefault(name, last["entry"]) is last["entry"]:
                return  # another layer already folded this very input into the shared entry
            x = inputs[0].detach().float()
            if name not in hessians:
                hessians[name] = [torch.zeros(packed_size(x.shape[-1]), device=x.device), 0]
            entry = hessians[name]
            entry[1] = accumulate_hessian(entry[0], x, entry[1])
            last["input"], last["entry"] = inputs[0], entry
        return hook

    try:
        for name, module in owners.items():
            if isinstance(module, (nn.Linear, *transposed_linear_types())):
                handles.append(module.register_forward_pre_hook(make_hook(name)))
        yield hessians
    finally:
        for h in handles:
            h.remove()
        last.clear()


def balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """The rank to hold each matrix: largest first, each to the least-loaded rank (ties to
    the lower rank), so that no rank holds all the large ones. Pure; the same on every rank."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world_size), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


class Hessians:
    """Layer name -> its H (averaged over ranks), each matrix held by its owner rank only.

    Names sharing a matrix (one input tensor) share one entry. ``fetch`` is the only way to
    read a matrix: a collective that brings it from its owner to every rank. Held: a packed
    H (1-D), a caller's whole matrix (``replicated``), or after ``invert`` the packed factor
    and its dead inputs."""

    def __init__(self, keys: dict[str, int], held: dict[int, torch.Tensor], owners: list[int | None],
                 shapes: list[torch.Size], backend: Backend | None):
        self._keys, self._shapes = keys, shapes
        self._held: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = dict(held)
        self._owners, self._backend = owners, backend
        self._percdamp: float | None = None  # set once ``invert`` has run

    @classmethod
    def replicated(cls, full: Mapping[str, torch.Tensor]) -> Hessians:
        """Every matrix already on every rank (one process, or a caller's own dict)."""
        keys = {name: i for i, name in enumerate(sorted(full))}
        return cls(keys, {i: full[name] for name, i in keys.items()}, [None] * len(keys),
                   [full[name].shape for name in keys], None)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def held_bytes(self) -> int:
        """What this rank holds, in bytes."""
        tensors = [t for h in self._held.values() for t in (h if isinstance(h, tuple) else (h,))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def invert(self, percdamp: float) -> None:
        """Replace every matrix this rank holds by its ``InverseFactor`` (in place: no more
        memory), so ``fetch`` brings factors from then on. A collective: a matrix that will
        not factor raises on every rank, and the Hessians are spent. Again with the same
        ``percdamp``: nothing to do."""
        if self._percdamp is not None:
            if percdamp != self._percdamp:
                raise ValueError(f"these Hessians were inverted with percdamp={self._percdamp} for an "
                                 f"earlier sweep, not {percdamp}: use the same percdamp for every "
                                 "decision from one probe")
            return
        failed = 0
        for key in sorted(self._held):
            held = self._held[key]
            try:
                factor = inverse_factor(self._whole(held), percdamp)
            except ValueError:
                failed = 1
                break
            self._held[key] = (pack_lower(factor.lower), factor.dead)
        backend = self._backend
        if backend is not None and backend.world_size > 1:
            failed = int(backend.all_reduce(torch.tensor([failed], device=backend.device), "max").item())
        if failed:
            self._held.clear()  # partly inverted: nothing consistent is left to decide from
            raise ValueError("the damped Hessian of a layer is not positive definite: probe again with "
                             "a higher percdamp (e.g. 0.1) or more calibration samples")
        self._percdamp = percdamp

    def fetch(self, names: list[str]) -> list[torch.Tensor | InverseFactor]:
        """The matrices of ``names`` on every rank (read-only), or their ``InverseFactor``
        once ``invert`` has run. A collective: every rank passes the same names in the same
        order."""
        brought: dict[int, torch.Tensor] = {}
        for name in names:
            key = self._keys[name]
            if key not in brought:
                brought[key] = self._bring(key)
        return [brought[self._keys[name]] for name in names]

    def _bring(self, key: int) -> torch.Tensor | InverseFactor:
        owner, backend = self._owners[key], self._backend
        if owner is None or backend is None or backend.world_size == 1:
            return self._whole(self._held[key])
        mine, held, n = backend.rank == owner, self._held.get(key), self._shapes[key][0]

        def from_owner(tensor, dtype=torch.float32, size=(packed_size(n),)):
            return backend.broadcast(tensor if mine else torch.empty(size, dtype=dtype, device=backend.device),
                                     src=owner)

        if self._percdamp is None:
            return self._whole(from_owner(held))
        lower, dead = held if mine else (None, None)
        dead = from_owner(dead.to(torch.uint8) if mine else None, torch.uint8, (n,))  # not every backend sends bool
        return self._whole((from_owner(lower), dead.bool()))

    def _whole(self, held: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | InverseFactor:
        """What ``fetch`` gives for a held (or received) entry."""
        if isinstance(held, tuple):
            lower, dead = held
            return InverseFactor(unpack_lower(lower), dead, self._percdamp)
        return unpack_symmetric(held) if held.dim() == 1 else held


def as_hessians(hessians: Hessians | Mapping[str, torch.Tensor]) -> Hessians:
    """``hessians`` as ``Hessians`` (a plain name -> H mapping is taken as on every rank)."""
    return hessians if isinstance(hessians, Hessians) else Hessians.replicated(hessians)


def average_over_ranks(local: dict[str, list], backend: Backend) -> Hessians:
    """Combine every rank's running means (``collect_input_hessians``), weighted by how many
    inputs each rank saw, onto each matrix's owner; the other ranks free their copies. In
    place: no matrix is held twice."""
    keys: dict[str, int] = {}
    key_of_entry: dict[int, int] = {}  # id of an entry (shared ones once) -> its key
    entries: list[list] = []
    for name in sorted(local):  # the same order on every rank
        keys[name] = key_of_entry.setdefault(id(local[name]), len(entries))
        if keys[name] == len(entries):
            entries.append(local[name])
    seen = torch.tensor([float(n) for _, n in entries], dtype=torch.float64)
    totals = backend.sum_over_ranks(seen.to(backend.device)).tolist()
    shapes = [torch.Size([side(H)] * 2) for H, _ in entries]
    owners = balanced_owners([shape.numel() for shape in shapes], backend.world_size)
    held = {}
    for key, (entry, total, owner) in enumerate(zip(entries, totals, owners)):
        H, n = entry
        H.mul_(n / total if total else 0.0)
        backend.sum_to_rank(H, dst=owner)
        if backend.rank == owner:
            held[key] = H
        entry[0] = None  # the caller's dict no longer keeps the matrix alive
    return Hessians(keys, held, list(owners), shapes, backend)
