"""The decision is a pure function of the record: hand-made records with known gradient
ratios give known masks, equivalent thresholds and counts, with no process group and no
GradProbe, and deciding changes neither the record nor anything else."""
import copy

import pytest
import torch

from gradprobe_dist.parallel.base import LocalSlice
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe.decision import decide
from gradprobe_dist.probe.record import LayerProbe, ProbeRecord

BACKEND = LocalBackend()


def _layer(tentative, ratios):
    """A layer whose tentative weights have the given new/old ratios (old = 1)."""
    tentative = torch.tensor(tentative)
    n = int(tentative.sum())
    return LayerProbe(tentative, torch.ones(n), torch.arange(1.0, n + 1), torch.tensor(ratios))


def _record(**extra):
    layers = {"a": _layer([[True, True, False, True]], [0.5, 1.2, 3.0]),
              "b": _layer([[False, True, True, True]], [0.9, 0.1, 2.0])}
    slices = {n: LocalSlice(torch.Size([1, 4]), "full") for n in layers}
    return ProbeRecord(layers, slices, **extra)


def _masks(decision):
    return {n: m.int().tolist()[0] for n, m in decision.masks.items()}


def test_threshold_mode_prunes_the_ratios_at_or_below_one_plus_threshold():
    strict = decide(_record(), 0.5, BACKEND, gradient_threshold=0.0)
    assert _masks(strict) == {"a": [1, 0, 0, 0], "b": [0, 1, 1, 0]}
    assert strict.tentative == {"a": 3, "b": 3} and strict.pruned == {"a": 1, "b": 2}
    assert strict.equivalent_threshold is None and strict.total_pruned == 3
    loose = decide(_record(), 0.5, BACKEND, gradient_threshold=0.25)
    assert _masks(loose) == {"a": [1, 1, 0, 0], "b": [0, 1, 1, 0]}


def test_target_mode_takes_exactly_the_lowest_ratios_per_layer_or_globally():
    layer = decide(_record(), 0.5, BACKEND, mode="target")  # 2 of each layer's 4
    assert _masks(layer) == {"a": [1, 1, 0, 0], "b": [0, 1, 1, 0]}
    assert layer.equivalent_threshold == pytest.approx(0.2)  # worst pruned ratio 1.2
    overall = decide(_record(), 0.375, BACKEND, mode="target", target_scope="global")  # 3 of 8
    assert _masks(overall) == {"a": [1, 0, 0, 0], "b": [0, 1, 1, 0]}
    assert overall.equivalent_threshold == 0.0  # worst pruned ratio 0.9


def test_the_record_carries_the_allocated_layer_sparsity_and_the_nm_pattern():
    allocated = decide(_record(layer_sparsity={"a": 0.25, "b": 0.75}), 0.5, BACKEND, mode="target")
    assert _masks(allocated) == {"a": [1, 0, 0, 0], "b": [0, 1, 1, 1]}
    nm = decide(_record(nm=(1, 2)), 0.5, BACKEND, mode="target")  # 1 of every 2 inputs
    # a: groups (0.5, 1.2) and (not tentative, 3.0): the non-candidate ranks last
    # b: groups (not tentative, 0.9) and (0.1, 2.0)
    assert _masks(nm) == {"a": [1, 0, 0, 1], "b": [0, 1, 1, 0]}


def test_deciding_changes_nothing():
    record = _record(layer_sparsity={"a": 0.25, "b": 0.75})
    before = copy.deepcopy(record)
    first = decide(record, 0.5, BACKEND, mode="target")
    second = decide(record, 0.5, BACKEND, mode="target")
    assert _masks(first) == _masks(second)
    for name, layer in record.layers.items():
        for field in ("tentative", "old", "originals", "new"):
            assert torch.equal(getattr(layer, field), getattr(before.layers[name], field))
    assert record.layer_sparsity == before.layer_sparsity
