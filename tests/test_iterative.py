"""Iterative pruning in one process: the schedule formulas, each round's exact sparsity, masks
that only grow, pruned weights held at zero through fine-tuning, and resume == no crash."""
import json

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP, WandaPruning
from gradprobe_dist.checkpoint import (CheckpointMismatchError, MaskCheckpoint, load_masks,
                                      model_fingerprint)
from gradprobe_dist.pipeline.iterative import WEIGHTS_FILE, iterative_prune
from gradprobe_dist.pipeline.rounds import schedule_values, tentative_fraction
from gradprobe_dist.probe.guard import probe_wins
from gradprobe_dist.checkpoint.format import RATIO_KEY
from gradprobe_dist.strategies.base import PruningStrategy, count_to_select

LOSS = nn.CrossEntropyLoss()
BATCHES = 3


def _model(seed: int = 0) -> SimpleMLP:
    torch.manual_seed(seed)
    return SimpleMLP(12, [24], 4)


def _batches(seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(BATCHES)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _finetune(log: list | None = None, crash_at: int | None = None):
    """A deterministic fine-tune (seeded by the round) with momentum and weight decay, which
    would revive pruned weights if the masks were not held; records what it saw."""
    data = _batches(seed=7)

    def finetune(model, number):
        if number == crash_at:
            raise KeyboardInterrupt("killed")
        torch.manual_seed(number)
        before = _weights(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        model.train()
        for x, y in data * 2:
            opt.zero_grad()
            LOSS(model(x + 0.1 * torch.randn_like(x)), y).backward()
            opt.step()
        if log is not None:
            log.append((number, before, _weights(model)))

    return finetune


def _run(directory=None, model=None, **kwargs):
    model = model if model is not None else _model()
    probe = GradProbe(model, kwargs.pop("strategy", MagnitudePruning()))
    settings = dict(target=0.75, rounds=3, num_batches=BATCHES) | kwargs
    rows = iterative_prune(probe, _batches(), LOSS, checkpoint_dir=directory, **settings)
    return probe, rows


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# -- the schedule ----------------------------------------------------------------------------
def test_schedule_values_follow_the_formulas():
    # cubic, by hand: 0.8 * (1 - (1 - r/4)^3) = 0.8 * (37/64, 56/64, 63/64, 1)
    assert schedule_values(0.8, 4) == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert schedule_values(0.6, 3, "linear") == pytest.approx([0.2, 0.4, 0.6])
    cubic, linear = schedule_values(0.9, 7), schedule_values(0.9, 7, "linear")
    assert cubic[-1] == linear[-1] == 0.9  # exactly the target
    assert all(a < b for a, b in zip(cubic, cubic[1:]))
    assert all(c >= l for c, l in zip(cubic, linear))  # cubic prunes early, while it is cheap
    assert schedule_values(0.5, 1) == [0.5]


def test_a_round_oversamples_its_increment_not_the_whole_target():
    values = [0.4, 0.6, 0.9]
    assert tentative_fraction(values, 1, 1.5) == pytest.approx(0.6)  # 0 + 1.5 * 0.4
    assert tentative_fraction(values, 2, 1.5) == pytest.approx(0.7)  # 0.4 + 1.5 * 0.2
    assert tentative_fraction(values, 3, 1.0) == pytest.approx(0.9)
    assert tentative_fraction(values, 3, 5.0) == 1.0


@pytest.mark.parametrize("args, error, match", [
    ((0.0, 3), ValueError, "target"), ((1.0, 3), ValueError, "target"),
    (("0.5", 3), TypeError, "target"), ((0.5, 0), ValueError, "rounds"),
    ((0.5, 2.0), ValueError, "rounds"), ((0.5, True), ValueError, "rounds"),
    ((0.5, 3, "quadratic"), ValueError, "cubic"),
])
def test_schedule_values_refuse_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        schedule_values(*args)


# -- rounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [MagnitudePruning(), WandaPruning()], ids=["magnitude", "wanda"])
def test_target_mode_reaches_every_round_exactly_and_masks_only_grow(tmp_path, strategy):
    model = _model()
    original = _weights(model)
    probe, rows = _run(tmp_path, model=model, strategy=strategy, schedule="linear")
    values = schedule_values(0.75, 3, "linear")
    numels = {n: original[n].numel() for n in probe.param_names}
    previous = {n: torch.zeros_like(original[n], dtype=torch.bool) for n in probe.param_names}
    for number, (row, value) in enumerate(zip(rows, values), start=1):
        masks = load_masks(tmp_path / f"round-{number:03d}")
        for name, mask in masks.items():
            assert int(mask.sum()) == count_to_select(numels[name], value), (number, name)
            assert bool((mask | ~previous[name]).all())  # every earlier pruned weight stays pruned
        ckpt = MaskCheckpoint.read(tmp_path / f"round-{number:03d}")
        for name in masks:
            info = ckpt.layer_info(name)
            assert info["pruned"] == info["carried"] + info["tentative"] - info["restored"]
            assert info["carried"] == int(previous[name].sum())
            if isinstance(strategy, MagnitudePruning):  # it re-selects the zeros, then the smallest
                selected = count_to_select(numels[name], tentative_fraction(values, number, 1.5))
                assert info["tentative"] == selected - info["carried"]
        assert row["pruned"] == sum(int(m.sum()) for m in masks.values())
        assert row["newly_pruned"] == row["pruned"] - sum(int(m.sum()) for m in previous.values())
        assert row["sparsity"] == row["pruned"] / sum(numels.values())
        previous = masks
    weights = _weights(model)
    for name, mask in previous.items():
        assert torch.equal(probe.masks[name], mask)
        assert bool((weights[name][mask] == 0).all())
        assert torch.equal(weights[name][~mask], original[name][~mask])  # no finetune: untouched


def test_global_scope_reaches_the_total_exactly():
    probe, rows = _run(strategy=MagnitudePruning(scope="global"), target_scope="global")
    total = sum(p.numel() for n, p in probe.model.named_parameters() if n in probe.param_names)
    for row, value in zip(rows, schedule_values(0.75, 3)):
        assert row["pruned"] == count_to_select(total, value)
    assert sum(int(m.sum()) for m in probe.masks.values()) == rows[-1]["pruned"]


class MagnitudeMasks(PruningStrategy):
    """Magnitude through the original API only (no scores): one-shot target mode then ranks
    candidates by gradient ratio, as rounds do for a strategy without scores."""

    def select_weights_to_prune(self, model, sparsity):
        return MagnitudePruning().select_weights_to_prune(model, sparsity)

    def get_name(self):
        return "magnitude_masks"


@pytest.mark.parametrize("strategy", [MagnitudePruning(), MagnitudePruning(scope="global")])
def test_target_rounds_without_veto_walk_the_strategys_order(strategy):
    """With nothing vetoed each round takes the strategy's own quota of the current weights,
    the earlier rounds' zeros first: for magnitude (zeroing the smallest leaves the order of
    the rest) the rounds end at magnitude's own one-shot masks, which ranking the candidates
    by gradient ratio would not give."""
    alone = GradProbe(_model(), strategy).prune_by_strategy(_batches(), LOSS, 0.75, BATCHES)
    probe, rows = _run(strategy=strategy, veto_fraction=0.0,
                       target_scope="global" if strategy.scope == "global" else "layer")
    assert [r["sparsity"] for r in rows][-1] == pytest.approx(0.75, abs=1e-2)
    for name, mask in alone.items():
        assert torch.equal(probe.masks[name], mask), name
    vetoed, _ = _run(strategy=strategy, veto_fraction=0.3,
                     target_scope="global" if strategy.scope == "global" else "layer")
    assert any(not torch.equal(vetoed.masks[n], m) for n, m in alone.items())  # the veto moves some


@pytest.mark.parametrize("mode, strategy, options", [
    ("target", MagnitudePruning, {}),  # the strategy's order, the ratio-vetoed candidates last
    ("target", MagnitudePruning, {"veto_fraction": 0.3}),
    ("target", WandaPruning, {"veto_fraction": 0.3}),
    ("target", MagnitudeMasks, {}),  # no scores: the lowest ratios
    ("threshold", MagnitudePruning, {})])
def test_one_round_is_one_shot_pruning(mode, strategy, options):
    one_shot = _model()
    masks = GradProbe(one_shot, strategy()).prune(
        _batches(), LOSS, sparsity=0.6, num_batches=BATCHES, gradient_threshold=0.1, mode=mode,
        oversample=1.5, **options)
    probe, _ = _run(target=0.6, rounds=1, mode=mode, gradient_threshold=0.1, strategy=strategy(), **options)
    for name, mask in masks.items():
        assert torch.equal(probe.masks[name], mask)
    for (name, a), b in zip(probe.model.named_parameters(), one_shot.parameters()):
        assert torch.equal(a, b), name


def test_threshold_mode_prunes_the_alive_candidates_whose_gradient_did_not_grow(tmp_path):
    tau = 0.05
    _, rows = _run(tmp_path, mode="threshold", gradient_threshold=tau)
    assert rows[-1]["pruned"] > 0
    previous = None
    for number, row in enumerate(rows, start=1):
        assert row["sparsity"] <= row["schedule"]
        ckpt = MaskCheckpoint.read(tmp_path / f"round-{number:03d}")
        masks = load_masks(tmp_path / f"round-{number:03d}")
        for name in masks:
            info = ckpt.layer_info(name)
            ratio = ckpt.load_layer_tensors(name)[RATIO_KEY]  # one per alive candidate
            assert ratio.numel() == info["tentative"]
            assert info["pruned"] - info["carried"] == int((ratio <= 1 + tau).sum())
            if previous is not None:
                assert bool((masks[name] | ~previous[name]).all())
        previous = masks


def test_finetune_runs_between_rounds_with_pruned_weights_held_at_zero():
    seen = []
    probe, rows = _run(finetune=_finetune(seen))
    assert [number for number, _, _ in seen] == [1, 2, 3]
    for number, before, after in seen:
        assert sum(int((before[n] == 0).sum()) for n in probe.param_names) == rows[number - 1]["pruned"]
        changed = 0
        for name in probe.param_names:
            pruned = before[name] == 0
            assert bool((after[name][pruned] == 0).all()), (number, name)  # momentum + decay held off
            changed += int((after[name][~pruned] != before[name][~pruned]).sum())
        assert changed > 0  # it did train the alive weights
    for name, mask in probe.masks.items():
        assert bool((probe.model.get_parameter(name)[mask] == 0).all())


# -- checkpoint and resume ---------------------------------------------------------------------
def test_resume_after_a_kill_ends_identical_to_an_uninterrupted_run(tmp_path):
    whole, whole_rows = _run(tmp_path / "whole", finetune=_finetune())

    with pytest.raises(KeyboardInterrupt):  # killed during round 3's fine-tuning
        _run(tmp_path / "cut", finetune=_finetune(crash_at=3))
    state = json.loads((tmp_path / "cut" / "schedule.json").read_text())
    assert [row["round"] for row in state["completed"]] == [1, 2]
    # and a half-written round 3 from an earlier attempt, with a wrong mask, must be discarded
    model = _model()
    leftover = MaskCheckpoint.open(tmp_path / "cut" / "round-003",
                                   model_fingerprint=model_fingerprint(model), config={})
    leftover.save_layer("head.weight", torch.ones(4, 24, dtype=torch.bool),
                        stats={"tentative": 0, "restored": 0, "seconds": 0.0})

    seen = []
    resumed, resumed_rows = _run(tmp_path / "cut", finetune=_finetune(seen))
    assert [number for number, _, _ in seen] == [3]  # rounds 1-2 were loaded, not redone
    assert _without_seconds(resumed_rows) == _without_seconds(whole_rows)
    for (name, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.equal(a, b), name  # bit-identical weights
    for number in (1, 2, 3):
        cut = load_masks(tmp_path / "cut" / f"round-{number:03d}")
        ref = load_masks(tmp_path / "whole" / f"round-{number:03d}")
        assert all(torch.equal(cut[n], ref[n]) for n in ref)
    # only the latest round keeps the fine-tuned weights
    kept = [(tmp_path / "cut" / f"round-{r:03d}" / WEIGHTS_FILE).exists() for r in (1, 2, 3)]
    assert kept == [False, False, True]

    again = []  # a finished run reruns as a no-op that restores the final model
    done, done_rows = _run(tmp_path / "cut", finetune=_finetune(again))
    assert again == [] and done_rows == resumed_rows
    assert all(torch.equal(a, b) for a, b in zip(done.model.parameters(), whole.model.parameters()))


@pytest.mark.parametrize("change, field", [
    ({"rounds": 4}, "rounds"), ({"target": 0.7}, "target"), ({"schedule": "linear"}, "schedule"),
    ({"strategy": MagnitudePruning(scope="global")}, "strategy"), ({"mode": "threshold"}, "mode"),
])
def test_a_different_schedule_is_refused_naming_the_field(tmp_path, change, field):
    _run(tmp_path, rounds=3, target=0.75)
    with pytest.raises(CheckpointMismatchError, match=rf"{field}="):
        _run(tmp_path, **({"rounds": 3, "target": 0.75} | change))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"strategy": MagnitudePruning(pattern="2:4")}, ValueError, "N:M"),
    ({"finetune": 5}, TypeError, "finetune"),
    ({"mode": "fast"}, ValueError, "mode"),
    ({"oversample": 0.5}, ValueError, "oversample"),
    ({"target": 1.0}, ValueError, "target"),
    ({"num_batches": 0}, ValueError, "num_batches"),
    ({"guard": True, "finetune": lambda model, number: None}, ValueError, "finetune"),
    ({"guard": True, "mode": "threshold"}, ValueError, "target mode"),
    ({"guard_batches": _batches(seed=9)}, ValueError, "guard=True"),
    ({"guard": True, "guard_batches": []}, ValueError, "guard_batches is empty"),
])
def test_bad_input_is_refused_before_any_probing(kwargs, error, match):
    model = _model()
    original = _weights(model)
    with pytest.raises(error, match=match):
        _run(model=model, **kwargs)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def _batch_losses(model, batches=None) -> torch.Tensor:
    with torch.no_grad():
        return torch.tensor([float(LOSS(model(x), y)) for x, y in batches or _batches()], dtype=torch.float64)


@pytest.mark.parametrize("held_out", [None, _batches(seed=9)], ids=["probe batches", "held-out batches"])
@pytest.mark.parametrize("strategy", [MagnitudePruning(), WandaPruning()])
def test_guard_keeps_whichever_of_rounds_and_strategy_has_the_lower_calibration_loss(strategy, held_out):
    """The guarded run ends with exactly the rounds' masks or exactly the strategy's own, the
    one whose calibration losses win (``probe_wins``) on the batches the guard scores (the
    rounds' own or ``guard_batches``), on the dense values elsewhere."""
    dense = _weights(_model())
    rounds_probe, _ = _run(strategy=strategy)
    alone = GradProbe(_model(), strategy)
    alone_masks = alone.prune_by_strategy(_batches(), LOSS, 0.75, BATCHES)
    probe, rows = _run(strategy=strategy, guard=True, guard_batches=held_out)
    report = probe.guard_report
    assert [r["sparsity"] for r in rows][-1] == pytest.approx(0.75, abs=1e-3)
    rounds_losses, alone_losses = _batch_losses(rounds_probe.model, held_out), _batch_losses(alone.model, held_out)
    assert report["veto_loss"] == pytest.approx(float(rounds_losses.mean()), rel=1e-5)
    assert report["strategy_loss"] == pytest.approx(float(alone_losses.mean()), rel=1e-5)
    wins = probe_wins(rounds_losses, alone_losses)[0]
    assert report["kept"] == ("probe rounds" if wins else "strategy")
    kept = rounds_probe.masks if wins else alone_masks
    assert kept.keys() == probe.masks.keys()
    params = dict(probe.model.named_parameters())
    for name, mask in kept.items():
        assert torch.equal(probe.masks[name], mask), name
        assert (params[name][mask] == 0).all() and torch.equal(params[name][~mask], dense[name][~mask]), name
    kept_loss = report["veto_loss"] if wins else report["strategy_loss"]
    assert float(_batch_losses(probe.model, held_out).mean()) == pytest.approx(kept_loss, rel=1e-5)


def test_guard_can_go_either_way():
    """Both verdicts happen on these subjects (else the test above checks one branch only)."""
    verdicts = {_run(model=_model(seed), strategy=strategy, guard=True)[0].guard_report["kept"]
                for seed in range(4) for strategy in (MagnitudePruning(), WandaPruning())}
    assert verdicts == {"probe rounds", "strategy"}
