"""Target mode walks the strategy's own order with the probe as a veto (probe/target.py):
with nothing vetoed the masks are the strategy's exactly; with a veto the quota is still
exact and the vetoed candidates go last; a strategy without scores falls back to the
lowest gradient ratios; the calibration-loss guard keeps the better of the two; 2 FSDP2
ranks give one process's masks."""
import copy
import dataclasses
import weakref

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, MagnitudePruning, RandomPruning, SimpleMLP, WandaPruning
from gradprobe_dist.parallel import build_backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe.decision import check_nm
from gradprobe_dist.probe.engine import ProbeEngine
from gradprobe_dist.probe.guard import guarded, probe_wins
from gradprobe_dist.probe.veto import probe_vetoes
from gradprobe_dist.strategies import PruningStrategy, SelectionContext
from gradprobe_dist.strategies.activations import collect_input_sq_norms
from gradprobe_dist.strategies.base import count_to_select
from multiproc import run_ranks

LOSS = nn.CrossEntropyLoss()


def _data(n=4, b=32):
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 24)
    return [(torch.randn(b, 24, generator=g) * scales, torch.randint(0, 6, (b,), generator=g))
            for _ in range(n)]


HELD_OUT = _data(n=6)[4:]  # two calibration batches after the probe's four


def _model():
    torch.manual_seed(0)
    return SimpleMLP(24, [32, 16], 6)


def _strategy_alone(strategy, sparsity):
    """The strategy's own masks at ``sparsity`` on the dense model (Wanda's norms from the
    same calibration batches)."""
    model = _model()
    context = SelectionContext.for_model(model)
    with collect_input_sq_norms({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}) as norms:
        with torch.no_grad():
            for x, _ in _data():
                model(x)
    context.input_sq_norms = {f"{n}.weight": v for n, v in norms.items()}
    return strategy.select(context, sparsity)


STRATEGIES = [(MagnitudePruning, {}), (MagnitudePruning, {"scope": "global"}), (MagnitudePruning, {"pattern": "2:4"}),
              (WandaPruning, {}), (WandaPruning, {"pattern": "2:4"}), (RandomPruning, {"seed": 3})]


@pytest.mark.parametrize("cls, options", STRATEGIES)
def test_with_no_veto_the_masks_are_the_strategys_exactly(cls, options):
    model = _model()
    masks = GradProbe(model, cls(**options)).prune(_data(), LOSS, 0.5, 4, mode="target", veto_fraction=0.0)
    alone = _strategy_alone(cls(**options), 0.5)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(mask, alone[name]), name
        assert (params[name][mask] == 0).all()


@pytest.mark.parametrize("cls, options", STRATEGIES)
@pytest.mark.parametrize("fraction", [0.2, 0.6])
def test_with_a_veto_the_quota_is_exact_and_vetoed_candidates_go_last(cls, options, fraction):
    model = _model()
    probe = GradProbe(model, cls(**options))
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5)
    vetoes = probe_vetoes(probe.backend, record, fraction=fraction)
    masks = probe.decide(record, 0.5, mode="target", veto_fraction=fraction)
    alone = _strategy_alone(cls(**options), 0.5)
    for name, mask in masks.items():
        cols = mask.shape[1]
        assert not (mask & ~record.layers[name].tentative).any()
        if "pattern" in options:
            check_nm(mask, 2, 4, exact=True)
        elif cls is WandaPruning:
            assert (mask.sum(1) == count_to_select(cols, 0.5)).all(), name
        elif options.get("scope") != "global":
            assert int(mask.sum()) == count_to_select(mask.numel(), 0.5), name
        if options.get("scope") != "global":
            # vetoed candidates are taken only where too few unvetoed ones remain
            groups = (mask.shape[0], -1, 4) if "pattern" in options else \
                (mask.shape[0], -1) if cls is WandaPruning else (1, -1)
            quota = mask.reshape(groups).sum(-1)
            free = (record.layers[name].tentative & ~vetoes[name]).reshape(groups).sum(-1)
            taken = (mask & vetoes[name]).reshape(groups).sum(-1)
            assert torch.equal(taken, (quota - free).clamp(min=0)), name
    if options.get("scope") == "global":
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == count_to_select(total, 0.5)
    assert any(not torch.equal(masks[n], alone[n]) for n in masks)  # the veto moved something


def test_vetoed_weights_are_replaced_by_the_next_in_wandas_row_order():
    model = _model()
    probe = GradProbe(model, WandaPruning())
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5)
    vetoes = probe_vetoes(probe.backend, record, fraction=0.2)
    masks = probe.decide(record, 0.5, mode="target", veto_fraction=0.2)
    context = SelectionContext.for_model(_model())
    context.input_sq_norms = record.input_sq_norms
    scores = WandaPruning().scores(context)
    for name, mask in masks.items():
        # per row: unvetoed candidates by Wanda score, then vetoed ones by score, then the rest
        rank_class = (~record.layers[name].tentative).long() * 2 + vetoes[name].long()
        by_score = torch.sort(scores[name], dim=1, stable=True).indices
        order = by_score.gather(1, torch.sort(rank_class.gather(1, by_score), dim=1, stable=True).indices)
        k = count_to_select(mask.shape[1], 0.5)
        expected = torch.zeros_like(mask).scatter_(1, order[:, :k], True)
        assert (mask & vetoes[name]).any() or name != "layers.0.weight"  # some rows had to take one
        assert torch.equal(mask, expected), name


class MasksOnly(PruningStrategy):
    """A user strategy that only returns masks (magnitude's, through the original API)."""

    def select_weights_to_prune(self, model, sparsity):
        return MagnitudePruning().select_weights_to_prune(model, sparsity)

    def get_name(self):
        return "masks_only"


def test_a_strategy_without_scores_falls_back_to_the_lowest_ratios():
    model = _model()
    probe = GradProbe(model, MasksOnly())
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5)
    masks = probe.decide(record, 0.5, mode="target")
    for name, layer in record.layers.items():
        assert int(masks[name].sum()) == count_to_select(masks[name].numel(), 0.5)
        ratio, pruned = layer.ratio(), masks[name][layer.tentative]
        assert ratio[pruned].max() <= ratio[~pruned].min()
    with pytest.raises(ValueError, match="gives no scores"):
        GradProbe(_model(), MasksOnly()).prune(_data(), LOSS, 0.5, 4, mode="target", guard=True)


@pytest.mark.parametrize("options, match", [({"guard_batches": HELD_OUT}, "guard=True"),
                                            ({"guard": True, "guard_batches": []}, "guard_batches is empty")])
def test_held_out_guard_batches_without_a_guard_or_empty_are_refused_before_probing(options, match):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        GradProbe(model, WandaPruning()).prune(_data(), LOSS, 0.5, 4, mode="target", **options)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _batch_losses(model, masks, batches=None) -> torch.Tensor:
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask, 0.0)
        return torch.tensor([float(LOSS(model(x), y)) for x, y in batches or _data()], dtype=torch.float64)


@pytest.mark.parametrize("held_out", [None, HELD_OUT], ids=["probe batches", "held-out batches"])
@pytest.mark.parametrize("cls, options", [(WandaPruning, {}), (MagnitudePruning, {"pattern": "2:4"})])
def test_the_guard_keeps_the_masks_with_the_lower_calibration_loss(cls, options, held_out):
    """Scored on the probe's batches or on ``guard_batches`` held out from it."""
    dense = _model()
    model = copy.deepcopy(dense)
    probe = GradProbe(model, cls(**options))
    masks = probe.prune(_data(), LOSS, 0.5, 4, mode="target", veto_fraction=0.3, guard=True,
                        guard_batches=held_out)
    vetoed = GradProbe(copy.deepcopy(dense), cls(**options)).prune(_data(), LOSS, 0.5, 4, mode="target",
                                                                   veto_fraction=0.3)
    own = _strategy_alone(cls(**options), 0.5)
    report = probe.guard_report
    vetoed_losses, own_losses = _batch_losses(dense, vetoed, held_out), _batch_losses(dense, own, held_out)
    assert report["veto_loss"] == pytest.approx(float(vetoed_losses.mean()), rel=1e-5)
    assert report["strategy_loss"] == pytest.approx(float(own_losses.mean()), rel=1e-5)
    wins, error = probe_wins(vetoed_losses, own_losses)
    assert report["difference_se"] == pytest.approx(error, rel=1e-4, abs=1e-9)
    kept = vetoed if wins else own
    assert report["kept"] == ("probe veto" if kept is vetoed else "strategy")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(mask, kept[name])
        assert torch.equal(params[name] == 0, kept[name] | (dict(dense.named_parameters())[name] == 0))


def test_the_probe_wins_only_by_more_than_two_standard_errors():
    """A lower mean is not enough: the paired per-batch difference must clear twice its own
    standard error (noise a held-out text need not share); one batch: strictly lower."""
    strategy = torch.tensor([4.0, 5.0, 3.0, 4.5], dtype=torch.float64)
    gain = torch.tensor([0.10, 0.12, 0.08, 0.11], dtype=torch.float64)  # mean 0.1025, SE 0.0085
    narrow = strategy - torch.tensor([0.30, -0.28, 0.02, -0.02], dtype=torch.float64)  # mean gain 0.005
    one_to_two = strategy - torch.tensor([-0.02, 0.12, 0.02, 0.08], dtype=torch.float64)  # 1.6 SE
    wins, error = probe_wins(strategy - gain, strategy)
    assert wins and error == pytest.approx(float(gain.std()) / 2)
    assert float((narrow - strategy).mean()) < 0 and not probe_wins(narrow, strategy)[0]
    _, error = probe_wins(one_to_two, strategy)
    assert error < float((strategy - one_to_two).mean()) < 2 * error and not probe_wins(one_to_two, strategy)[0]
    assert not probe_wins(strategy, strategy)[0] and not probe_wins(strategy + 0.1, strategy)[0]
    assert probe_wins(torch.tensor([1.0]), torch.tensor([1.5])) == (True, 0.0)
    assert not probe_wins(torch.tensor([1.5]), torch.tensor([1.5]))[0]


@pytest.mark.parametrize("cls, options", [(WandaPruning, {}), (MagnitudePruning, {}),
                                          (MagnitudePruning, {"scope": "global"})])
def test_threshold_mode_without_the_probe_is_the_strategy_at_the_sparsity_reached(cls, options):
    """The guard's other side in threshold mode: the strategy's own masks, by its own rule,
    at the overall sparsity the threshold decision reached (what a user compares against)."""
    probe = GradProbe(_model(), cls(**options))
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1)
    threshold = probe.decide(record, 0.5, mode="threshold")
    own = probe.decide(record, 0.5, mode="threshold", veto=False)
    numel = sum(m.numel() for m in threshold.values())
    reached = sum(int(m.sum()) for m in threshold.values()) / numel
    assert 0.05 < reached < 0.5  # the probe restored some candidates: a lower sparsity to match
    expected = _strategy_alone(cls(**options), reached)
    assert any(not torch.equal(threshold[n], own[n]) for n in own)
    for name, mask in own.items():
        assert torch.equal(mask, expected[name]), name
        assert not bool((mask & ~record.layers[name].tentative).any())  # inside the candidates
    assert abs(sum(int(m.sum()) for m in own.values()) / numel - reached) < 1 / 24  # < a weight per row


def test_threshold_mode_guard_refuses_what_it_cannot_compare_before_probing():
    for strategy, match in ((MasksOnly(), "gives no scores"), (WandaPruning(pattern="2:4"), "2:4 pattern")):
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=match):
            GradProbe(model, strategy).prune(_data(), LOSS, 0.5, 4, mode="threshold", guard=True)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _CopyingEngine:
    """What ``guarded`` asks of the engine when decisions change kept weights: it records the
    order of events and, at each forward pass, how many weight copies are still alive."""

    def __init__(self):
        self.weights = torch.zeros(1000)
        self.copies: list[weakref.ref] = []
        self.events: list = []

    def weights_copy(self, names):
        copy_ = {"w": self.weights.clone()}
        self.copies.append(weakref.ref(copy_["w"]))
        return copy_

    def put_weights(self, weights):
        self.weights.copy_(weights["w"])

    def calibration_losses(self, batches, loss_of):
        self.events.append(("forward", float(self.weights[0]), sum(r() is not None for r in self.copies)))
        return torch.tensor([1.0, 1.1]) if float(self.weights[0]) == 1.0 else torch.tensor([2.0, 2.1])


@pytest.mark.parametrize("veto_wins", [True, False])
def test_the_guard_holds_one_weight_copy_while_scoring_and_releases_before(veto_wins):
    """SparseGPT's side: both decisions from the original weights first, ``release`` (the
    Hessians) before any batch runs, and at most one copy beside the live weights during
    the forward passes; the winner's weights are left in place."""
    engine = _CopyingEngine()

    def decide(veto):
        assert float(engine.weights[0]) == 0.0  # each side starts from the originals
        engine.weights.fill_(1.0 if veto == veto_wins else 2.0)  # the winner's weights are 1.0
        engine.events.append(("decide", veto))
        return veto

    kept, report = guarded(engine, ["w"], [], None, decide, None,
                           release=lambda: engine.events.append("release"))
    assert kept is veto_wins and report["kept"] == ("probe veto" if veto_wins else "strategy")
    assert engine.events[:3] == [("decide", True), ("decide", False), "release"]
    forwards = engine.events[3:]
    assert [e[0] for e in forwards] == ["forward", "forward"] and all(e[2] <= 1 for e in forwards)
    assert torch.equal(engine.weights, torch.ones(1000))


def test_decide_guarded_frees_the_hessians_only_when_asked():
    for keep in (True, False):
        probe = GradProbe(_model(), WandaPruning())
        record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.5, hessians=True)
        probe.decide_guarded(record, 0.5, HELD_OUT, LOSS, mode="sparsegpt", veto_fraction=0.3,
                             keep_hessians=keep)
        assert (record.hessians is not None) == keep


@pytest.mark.parametrize("veto_wins", [True, False])
@pytest.mark.parametrize("mode", ["target", "sparsegpt", "threshold"])
def test_the_guard_takes_either_side(monkeypatch, veto_wins, mode):
    """Whichever side measures lower is kept, masks and (SparseGPT's) updated weights alike."""
    low, high = torch.tensor([1.0, 1.2, 0.9, 1.1]), torch.tensor([2.0, 2.1, 2.2, 1.9])
    reference = {}
    for veto in (True, False):
        m = _model()
        p = GradProbe(m, WandaPruning())
        record = p.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.0 if mode == "threshold" else 1.5,
                         hessians=mode == "sparsegpt")
        reference[veto] = (p.decide(record, 0.5, mode=mode, veto_fraction=0.3, veto=veto),
                           {n: t.detach().clone() for n, t in m.named_parameters()})

    def losses(self, batches, loss_of):  # by the weights in place, whatever order the guard runs
        vetoed_in_place = all(torch.equal(t, reference[True][1][n]) for n, t in self.model.named_parameters())
        return low if vetoed_in_place == veto_wins else high

    monkeypatch.setattr(ProbeEngine, "calibration_losses", losses)
    model = _model()
    probe = GradProbe(model, WandaPruning())
    masks = probe.prune(_data(), LOSS, 0.5, 4, mode=mode, veto_fraction=0.3, guard=True)
    assert probe.guard_report["kept"] == (("probe threshold" if mode == "threshold" else "probe veto")
                                          if veto_wins else "strategy")
    want_masks, want_weights = reference[veto_wins]
    assert any(not torch.equal(reference[True][0][n], reference[False][0][n]) for n in masks)
    for name, param in model.named_parameters():
        assert torch.equal(param, want_weights[name]), name
        if name in masks:
            assert torch.equal(masks[name], want_masks[name])


def _target_on_ranks(backend, rank, world, pattern, guard):
    model = _model()
    width = 32 // world
    batches = [(x[rank * width:(rank + 1) * width], y[rank * width:(rank + 1) * width]) for x, y in _data()]
    probe = GradProbe(model, WandaPruning(pattern=pattern), backend=backend)
    masks = probe.prune(batches, LOSS, 0.5, 4, mode="target", veto_fraction=0.2, guard=guard)
    backend.prepare(model, probe.param_names)
    return {n: backend.gather_full(n, m) for n, m in masks.items()}, probe.guard_report


def _ranked(rank, world):
    return [_target_on_ranks(build_backend("fsdp", torch.device("cpu")), rank, world, pattern, guard)
            for pattern, guard in ((None, False), ("2:4", False), (None, True))]


def test_two_fsdp_ranks_equal_one_process():
    results = run_ranks(_ranked, 2, timeout=300)[0]
    for (pattern, guard), (masks, report) in zip(((None, False), ("2:4", False), (None, True)), results):
        ref_masks, ref_report = _target_on_ranks(LocalBackend(device="cpu"), 0, 1, pattern, guard)
        for name, mask in ref_masks.items():
            assert torch.equal(masks[name].reshape(mask.shape), mask), f"{pattern} guard={guard} {name}"
        if guard:
            assert report["kept"] == ref_report["kept"]
            assert report["veto_loss"] == pytest.approx(ref_report["veto_loss"], rel=1e-5)


def test_pipeline_guard_per_stage_and_veto_none_is_the_strategy(tmp_path, log_lines):
    from gradprobe_dist.checkpoint.store import load_masks
    from gradprobe_dist.pipeline.config import ConfigError, load_config
    from test_pipeline import STAGE_LAYERS, job_for, make_tiny_data, write_config

    data = make_tiny_data(tmp_path / "data")
    masks = {}
    for veto, guard in (("none", False), ("fraction", True)):
        config = write_config(tmp_path / f"{veto}.yaml", data, output_dir=tmp_path / veto,
                              prune={"mode": "target", "strategy": "wanda", "veto": veto, "guard": guard})
        job_for(config).run()
        masks[veto] = load_masks(tmp_path / veto)
    guarded = [line for line in log_lines if "guard (rank 0)" in line]
    assert len(guarded) == len(STAGE_LAYERS)  # one decision per stage, in stage order
    for line, stage in zip(guarded, STAGE_LAYERS):
        # veto none gives Wanda's own masks: the guard kept those unless the veto's loss was lower
        same = all(torch.equal(masks["none"][n], masks["fraction"][n]) for n in stage)
        assert ("keeping the strategy masks" in line) == same, line
        if not same:
            break  # the later stages start from a model the veto changed: Wanda's masks differ
    config = write_config(tmp_path / "sgpt.yaml", data, output_dir=tmp_path / "sgpt",
                          prune={"mode": "sparsegpt", "strategy": "wanda", "veto": "fraction", "guard": True})
    job_for(config).run()  # SparseGPT with the guard: both sides updated weights, one kept per stage
    assert len([line for line in log_lines if "guard (rank 0)" in line]) == 2 * len(STAGE_LAYERS)
    for bad, match in (({"mode": "target", "veto": "none", "guard": True}, "prune.guard compares"),
                       ({"mode": "threshold", "guard": True, "strategy_options": {"pattern": "2:4"}},
                        "prune.guard in threshold mode .* 2:4 pattern cannot express")):
        with pytest.raises(ConfigError, match=match):
            load_config(write_config(tmp_path / "bad.yaml", data, output_dir=tmp_path / "bad", prune=bad))


def test_pipeline_threshold_mode_guard_per_stage(tmp_path, log_lines):
    """Threshold mode with ``prune.guard``: every stage compares the probe's threshold decision
    with the strategy's own masks at the sparsity that decision reached, and keeps one."""
    from gradprobe_dist.checkpoint.store import load_masks
    from test_pipeline import STAGE_LAYERS, job_for, make_tiny_data, write_config

    data = make_tiny_data(tmp_path / "data")
    masks = {}
    for run, options in ((False, {}), (True, {"guard": True}), ("veto none", {"veto": "none"})):
        config = write_config(tmp_path / f"{run}.yaml", data, output_dir=tmp_path / str(run),
                              prune={"mode": "threshold", "strategy": "wanda", **options})
        job_for(config).run()
        masks[run] = load_masks(tmp_path / str(run))
    # prune.veto ranks target/sparsegpt candidates: threshold mode's masks stay the probe's
    assert all(torch.equal(masks[False][n], masks["veto none"][n]) for n in masks[False])
    guarded = [line for line in log_lines if "guard (rank 0)" in line]
    assert len(guarded) == len(STAGE_LAYERS)
    first = guarded[0]  # the first stage starts from the same dense model in both runs
    same = all(torch.equal(masks[False][n], masks[True][n]) for n in STAGE_LAYERS[0])
    assert ("keeping the probe threshold masks" in first) == same, first


def test_pipeline_guard_scores_the_held_out_batches_after_the_probes(tmp_path, monkeypatch):
    """``prune.guard_batches``: the guard scores the calibration batches read after the
    probe's ``num_batches`` (none of them probed), every stage; the probe's are never scored."""
    from gradprobe_dist.data.loader import shard_batches
    from gradprobe_dist.pipeline.config import ConfigError, load_config
    from test_pipeline import STAGE_LAYERS, job_for, make_tiny_data, write_config

    data = make_tiny_data(tmp_path / "data")
    scored = []
    real = ProbeEngine.calibration_losses

    def recording(self, batches, loss_of):
        scored.append([b["input_ids"].clone() for b in batches])
        return real(self, batches, loss_of)

    monkeypatch.setattr(ProbeEngine, "calibration_losses", recording)
    config = write_config(tmp_path / "held.yaml", data, output_dir=tmp_path / "held",
                          prune={"mode": "target", "strategy": "wanda", "veto": "fraction", "guard": True,
                                 "guard_batches": 2})
    job = job_for(config)
    job.run()
    micro = job.cfg.data.micro_batch_size
    every = [b["input_ids"] for b in shard_batches(data["calib"], micro_batch_size=micro, num_batches=6)]
    assert len(scored) == 2 * len(STAGE_LAYERS)  # both sides of every stage's decision
    for batches in scored:
        assert len(batches) == 2 and all(torch.equal(a, b) for a, b in zip(batches, every[4:]))
    with pytest.raises(ConfigError, match="prune.guard_batches"):
        load_config(write_config(tmp_path / "bad.yaml", data, output_dir=tmp_path / "bad",
                                 prune={"mode": "target", "guard": True, "veto": "fraction", "guard_batches": -1}))
    # without the guard (e.g. prune.guard=false over a shipped config) the count is unused
    unguarded = load_config(write_config(tmp_path / "off.yaml", data, output_dir=tmp_path / "off",
                                         prune={"mode": "target", "guard_batches": 2})).prune
    assert unguarded.held_out_batches == 0
    assert "prune.guard_batches" not in dataclasses.replace(job.cfg, prune=unguarded).mask_fields()
    short = write_config(tmp_path / "short.yaml", data, output_dir=tmp_path / "short",
                         prune={"mode": "target", "strategy": "wanda", "veto": "fraction", "guard": True,
                                "guard_batches": 40})
    with pytest.raises(ValueError, match=r"prune.num_batches=4 \+ prune.guard_batches=40: lower either"):
        job_for(short).run()
    assert not (tmp_path / "short").exists()  # refused before anything was written


@pytest.mark.parametrize("mode", ["sparsegpt", "threshold"])
def test_the_guard_scores_with_both_decisions_masks_packed_and_returns_bool_masks(monkeypatch, mode):
    """While the guard's batches run, each decision's masks wait at one bit per weight and no
    bool copy is left on the probe; the kept masks come back as the same bool masks."""
    from gradprobe_dist.probe import gradprobe as gradprobe_module

    seen = []
    real_guarded = gradprobe_module.guarded

    def spying_guarded(engine, names, batches, loss_of, decide, reapply, **kwargs):
        decisions = []
        losses = engine.calibration_losses

        def scoring(*args):
            seen.append((probe.masks, [(m[0].dtype, m[0].numel() == -(-torch.Size(m[1]).numel() // 8))
                                       for d in decisions for m in d.masks.values()]))
            return losses(*args)

        monkeypatch.setattr(engine, "calibration_losses", scoring)
        return real_guarded(engine, names, batches, loss_of, lambda veto: decisions.append(decide(veto)) or decisions[-1],
                            reapply, **kwargs)

    monkeypatch.setattr(gradprobe_module, "guarded", spying_guarded)
    probe = GradProbe(_model(), WandaPruning())
    record = probe.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.0 if mode == "threshold" else 1.5, hessians=True)
    masks = probe.decide_guarded(record, 0.5, HELD_OUT, LOSS, mode=mode, veto_fraction=0.3)
    # bit-packed: uint8, one byte per eight weights
    assert len(seen) == 2 and all(held == {} and kinds and set(kinds) == {(torch.uint8, True)} for held, kinds in seen)
    kept_veto = probe.guard_report["kept"] != "strategy"
    reference = GradProbe(_model(), WandaPruning())
    again = reference.probe(_data(), LOSS, 0.5, 4, 0.1, oversample=1.0 if mode == "threshold" else 1.5, hessians=True)
    expected = reference.decide(again, 0.5, mode=mode, veto_fraction=0.3, veto=kept_veto)
    assert probe.masks is masks and set(masks) == set(expected)
    for name in expected:
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], expected[name])
