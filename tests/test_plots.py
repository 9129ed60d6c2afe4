"""Checkpoint plots: the threshold curve against direct counts and real decisions, the ratio
tensors' layout, and PNG files that are really PNGs."""
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP
from gradprobe_dist.checkpoint import MaskCheckpoint, model_fingerprint
from gradprobe_dist.checkpoint.format import RATIO_KEY
from gradprobe_dist.pipeline.iterative import iterative_prune
from gradprobe_dist.pipeline.plots import (draw_ratio_histograms, plot_checkpoint, ratio_tensors,
                                           threshold_curve)

LOSS = nn.CrossEntropyLoss()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _probe_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    model = SimpleMLP(12, [24], 4)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
               for _ in range(3)]
    return GradProbe(model, MagnitudePruning()), batches


def _assert_png(path, min_side=100):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side


def test_threshold_curve_equals_a_direct_count():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(50, generator=g) * 3, torch.tensor([0.0, 1.0, 1.25, 1.5, float("inf")])])
    b = torch.cat([torch.rand(30, generator=g) * 2, torch.full((20,), float("nan"))])  # not selected
    thresholds = [0.0, 0.25, 0.5, 1.0, 2.5]
    curve = threshold_curve({"a": a, "b": b}, total=200, thresholds=thresholds, carried=7)
    for t, value in zip(thresholds, curve):
        direct = 7 + int((a <= 1 + t).sum()) + int((b <= 1 + t).sum())  # NaN compares False
        assert value == direct / 200
    assert curve == sorted(curve) and curve[0] > 7 / 200


def test_threshold_curve_is_the_sparsity_threshold_mode_decides():
    probe, batches = _probe_and_batches()
    record = probe.probe(batches, LOSS, 0.6, 3, 0.1)
    ratios = ratio_tensors(record)
    total = sum(layer.tentative.numel() for layer in record.layers.values())
    thresholds = [0.0, 0.02, 0.1, 0.3]
    curve = threshold_curve(ratios, total, thresholds)
    decided = [sum(int(m.sum()) for m in record.masks(t).values()) / total for t in thresholds]
    assert curve == decided
    assert decided[0] < decided[-1]  # the example is not degenerate


def test_ratio_tensors_hold_each_selected_weights_ratio_and_nan_elsewhere():
    probe, batches = _probe_and_batches()
    record = probe.probe(batches, LOSS, 0.5, 3, 0.1)
    for name, ratio in ratio_tensors(record).items():
        layer = record.layers[name]
        assert ratio.shape == layer.tentative.shape and ratio.dtype == torch.float32
        assert torch.equal(ratio.isnan(), ~layer.tentative)
        assert torch.equal(ratio[layer.tentative], layer.ratio())


def test_threshold_curve_refuses_bad_input():
    with pytest.raises(ValueError, match="thresholds"):
        threshold_curve({"a": torch.ones(3)}, 3, [])
    with pytest.raises(ValueError, match="negative"):
        threshold_curve({"a": torch.ones(3)}, 3, [-0.1])
    with pytest.raises(ValueError, match="total"):
        threshold_curve({"a": torch.ones(3)}, 0, [0.0])


def test_plot_checkpoint_writes_valid_pngs_and_the_curve_of_the_decisions(tmp_path):
    probe, batches = _probe_and_batches()
    record = probe.probe(batches, LOSS, 0.6, 3, 0.1)
    chosen = 0.05
    masks = probe.apply_decisions(record, chosen)
    ckpt = MaskCheckpoint.open(tmp_path / "masks", model_fingerprint=model_fingerprint(probe.model),
                               config={"gradient_threshold": chosen})
    for name, ratio in ratio_tensors(record).items():
        tentative = int(record.layers[name].tentative.sum())
        ckpt.save_layer(name, masks[name], tensors={RATIO_KEY: ratio[~ratio.isnan()]},
                        stats={"tentative": tentative, "restored": tentative - int(masks[name].sum()),
                               "seconds": 0.0})
    thresholds = [0.0, chosen, 0.2, 1.0]
    paths = plot_checkpoint(tmp_path / "masks", tmp_path / "plots", thresholds=thresholds)
    assert [p.name for p in paths] == ["sparsity.png", "ratios-01.png", "threshold_curve.png",
                                       "threshold_curve.json"]
    for path in paths[:3]:
        _assert_png(path)
    numbers = json.loads(paths[3].read_text())
    total = sum(m.numel() for m in masks.values())
    assert numbers["thresholds"] == thresholds
    assert numbers["sparsity"] == [sum(int(m.sum()) for m in record.masks(t).values()) / total
                                   for t in thresholds]
    assert numbers["checkpoint_sparsity"] == numbers["sparsity"][1]  # the saved decision is on it


def test_an_iterative_round_curve_counts_the_weights_pruned_in_earlier_rounds(tmp_path):
    probe, batches = _probe_and_batches()
    tau = 0.05
    rows = iterative_prune(probe, batches, LOSS, target=0.7, rounds=2, num_batches=3,
                           mode="threshold", gradient_threshold=tau, checkpoint_dir=tmp_path / "run")
    paths = plot_checkpoint(tmp_path / "run" / "round-002", tmp_path / "plots", thresholds=[0.0, tau])
    numbers = json.loads(paths[-1].read_text())
    assert rows[0]["pruned"] > 0
    assert numbers["sparsity"][1] == numbers["checkpoint_sparsity"] == rows[1]["sparsity"]
    assert numbers["sparsity"][0] >= rows[0]["sparsity"]  # the carried weights are part of it


def test_a_checkpoint_without_ratios_gets_the_sparsity_plot_only(tmp_path):
    probe, _ = _probe_and_batches()
    ckpt = MaskCheckpoint.open(tmp_path / "masks", model_fingerprint=model_fingerprint(probe.model),
                               config={})
    with pytest.raises(ValueError, match="no saved layers"):
        plot_checkpoint(tmp_path / "masks", tmp_path / "plots")
    weight = probe.model.get_parameter("head.weight")
    ckpt.save_layer("head.weight", weight.abs() < 0.1,
                    stats={"tentative": 0, "restored": 0, "seconds": 0.0})
    paths = plot_checkpoint(tmp_path / "masks", tmp_path / "plots")
    assert [p.name for p in paths] == ["sparsity.png"]
    _assert_png(paths[0])


def test_ratio_histograms_page_many_layers(tmp_path):
    g = torch.Generator().manual_seed(0)
    ratios = {f"block.{i}.weight": torch.rand(40, generator=g) * 2 for i in range(17)}
    paths = draw_ratio_histograms(ratios, tmp_path)
    assert [p.name for p in paths] == ["ratios-01.png", "ratios-02.png"]  # 16 panels per page
    for path in paths:
        _assert_png(path)


def test_decided_ratios_are_made_one_layer_at_a_time_when_asked(monkeypatch):
    from gradprobe_dist.pipeline import rounds

    probe, batches = _probe_and_batches()
    record = probe.probe(batches, LOSS, 0.5, 3, 0.1)
    g = torch.Generator().manual_seed(3)
    before = {n: torch.rand(l.tentative.shape, generator=g) < 0.3 for n, l in record.layers.items()}
    made, make = [], rounds.ratio_tensor
    monkeypatch.setattr(rounds, "ratio_tensor", lambda layer: made.append(layer) or make(layer))
    calls = rounds.decided_ratios(record, before)
    assert made == [] and set(calls) == set(record.layers)  # nothing made until a layer is saved
    for count, (name, call) in enumerate(calls.items(), start=1):
        ratio = call()
        assert len(made) == count  # this layer's, and only its
        expected = ratio_tensors(record)[name].masked_fill(before[name], float("nan"))
        assert torch.equal(ratio.isnan(), expected.isnan())
        assert torch.equal(ratio[~ratio.isnan()], expected[~expected.isnan()])
