"""GradProbe's mode="sparsegpt": SparseGPT chooses the mask, the probe vetoes candidates
whose gradient grew (gradprobe_dist.probe.veto), in one process."""
import copy

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, SimpleMLP, SparseGPT, WandaPruning
from gradprobe_dist.probe.veto import probe_vetoes
from gradprobe_dist.strategies.base import count_to_select


def _data(n=4, b=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 24, generator=g), torch.randint(0, 6, (b,), generator=g)) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return SimpleMLP(24, [32, 16], 6)


def _record(model, oversample=1.5):
    probe = GradProbe(model, WandaPruning())
    return probe, probe.probe(_data(), nn.CrossEntropyLoss(), 0.5, 4, 0.1, oversample=oversample,
                              hessians=True)


def test_with_nothing_vetoed_it_is_plain_sparsegpt_on_the_same_hessians():
    model = _model()
    probe, record = _record(model)
    masks = probe.decide(record, 0.5, mode="sparsegpt", veto_fraction=0.0)  # nothing vetoed
    plain_model = _model()
    plain = SparseGPT(plain_model).prune_from(record.hessians, 0.5)
    params, plain_params = dict(model.named_parameters()), dict(plain_model.named_parameters())
    for name in masks:
        assert torch.equal(masks[name], plain[name])
        assert torch.equal(params[name], plain_params[name])


def test_threshold_veto_keeps_the_candidates_whose_gradient_grew():
    model = _model()
    probe, record = _record(model)
    vetoes = probe_vetoes(probe.backend, record, gradient_threshold=0.0)
    masks = probe.decide(record, 0.5, mode="sparsegpt", gradient_threshold=0.0)
    plain = SparseGPT(_model()).prune_from(record.hessians, 0.5)
    for name, layer in record.layers.items():
        grew = layer.expand(layer.ratio() > 1.0)
        assert torch.equal(vetoes[name], grew)
        assert grew.any()
        assert not (masks[name] & grew).any(), name  # 50% of weights: enough others remain
        assert int(masks[name].sum()) == int(plain[name].sum())  # SparseGPT's own quota
    assert any(not torch.equal(masks[n], plain[n]) for n in masks)  # the veto changed something


def test_fraction_veto_takes_each_layers_highest_ratios():
    _, record = _record(_model())
    vetoes = probe_vetoes(GradProbe(_model(), WandaPruning()).backend, record, fraction=0.25)
    for name, layer in record.layers.items():
        ratio = layer.ratio()
        vetoed = vetoes[name][layer.tentative]
        assert int(vetoed.sum()) == count_to_select(int(layer.tentative.sum()), 0.25)
        assert not vetoes[name][~layer.tentative].any()  # unprobed weights are never vetoed
        assert float(ratio[vetoed].min()) >= float(ratio[~vetoed].max())


def test_prune_with_mode_sparsegpt_reaches_the_sparsity_exactly():
    model = _model()
    dense = copy.deepcopy(model)
    masks = GradProbe(model, WandaPruning()).prune(_data(), nn.CrossEntropyLoss(), 0.5, 4,
                                                   mode="sparsegpt", veto_fraction=0.1)
    params, dense_params = dict(model.named_parameters()), dict(dense.named_parameters())
    for name, mask in masks.items():
        assert int(mask.sum()) == count_to_select(mask.numel(), 0.5)
        assert (params[name][mask] == 0).all()
        assert not torch.equal(params[name][~mask], dense_params[name][~mask])  # OBS-updated


@pytest.mark.parametrize("kwargs,match", [
    ({"reconstruct": True}, "drop reconstruct"),
    ({"veto_fraction": 1.5}, "veto_fraction"),
])
def test_bad_options_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradProbe(_model(), WandaPruning()).prune(_data(), nn.CrossEntropyLoss(), 0.5, 4,
                                                  mode="sparsegpt", **kwargs)


def test_fraction_veto_scores_one_gather_group_at_a_time(monkeypatch):
    """Each selection call gets one group's scores (at most the gather limit of candidates,
    or one larger layer alone), and the vetoes are those of one call over every layer."""
    import functools

    from gradprobe_dist.parallel import select
    from gradprobe_dist.probe import veto

    _, record = _record(_model())
    backend = GradProbe(_model(), WandaPruning()).backend
    whole = probe_vetoes(backend, record, fraction=0.25)
    limit = 500  # candidates per layer here: 576, 384, 72
    monkeypatch.setattr(veto, "selection_groups", functools.partial(select.selection_groups, gather_limit=limit))
    calls = []
    select_each = backend.select_smallest_each
    monkeypatch.setattr(backend, "select_smallest_each",
                        lambda scores, ks: calls.append([s.numel() for s in scores]) or select_each(scores, ks))
    grouped = probe_vetoes(backend, record, fraction=0.25)
    assert calls == [[384, 72], [576]]  # the groups under the limit, then the larger layer
    assert all(sum(c) <= limit or len(c) == 1 for c in calls)
    assert list(grouped) == list(whole)
    for name in whole:
        assert torch.equal(grouped[name], whole[name])


def test_sparsegpt_lets_each_veto_go_once_its_layer_is_pruned(monkeypatch):
    import weakref

    from gradprobe_dist.reconstruct import layers as layer_sweep

    probe, record = _record(_model())
    monkeypatch.setattr(layer_sweep, "LAYERS_AT_ONCE", 1)
    names = sorted(record.layers)
    refs = []

    def vetoes():
        made = probe_vetoes(probe.backend, record, fraction=0.25)
        refs[:] = [weakref.ref(made[n]) for n in names]
        return made

    alive_at_call = []
    sweep = layer_sweep.sparsegpt_layers
    monkeypatch.setattr(layer_sweep, "sparsegpt_layers",
                        lambda *a, **k: alive_at_call.append([r() is not None for r in refs]) or sweep(*a, **k))
    kept = vetoes()
    layer_sweep.sparsegpt_masks(probe.backend, record.hessians, 0.5, vetoes=kept)
    assert set(kept) == set(names) and all(r() is not None for r in refs)  # the caller's dict untouched
    del kept
    alive_at_call.clear()
    layer_sweep.sparsegpt_masks(probe.backend, record.hessians, 0.5, vetoes=vetoes())
    # no one else holds them: the i-th layer's sweep runs after the earlier layers' vetoes are gone
    assert alive_at_call == [[j >= i for j in range(len(names))] for i in range(len(names))]
    assert all(r() is None for r in refs)
