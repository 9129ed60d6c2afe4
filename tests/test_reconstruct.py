"""SparseGPT math (gradprobe_dist.reconstruct.obs and .sparsegpt), on CPU without any process group."""
import pytest
import torch

from gradprobe_dist.reconstruct.obs import accumulate_hessian, reconstruct_with_mask
from gradprobe_dist.reconstruct.sparsegpt import sparsegpt_prune

IN, OUT, TOKENS = 200, 24, 1500


def _layer(seed=0):
    """A weight and correlated, unevenly scaled inputs (as real activations are)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=gen) / IN ** 0.5
    scales = torch.logspace(-1, 1, IN)[torch.randperm(IN, generator=gen)]
    X = (torch.randn(TOKENS, IN, generator=gen) @ mixing) * scales
    W = torch.randn(OUT, IN, generator=gen)
    H = torch.zeros(IN, IN)
    n = 0
    for chunk in X.split(300):  # several calibration batches
        n = accumulate_hessian(H, chunk.view(3, 100, IN), n)
    return W, X, H


def _output_error(W, W_new, X):
    return float(((W - W_new) @ X.T).norm())


def _magnitude(W, sparsity):
    k = int(W.numel() * sparsity)
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    mask[W.abs().flatten().argsort()[:k]] = True
    return mask.view_as(W)


def test_hessian_is_mean_of_2xxT_over_all_rows():
    _, X, H = _layer()
    torch.testing.assert_close(H, 2 * X.T @ X / TOKENS, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6])
def test_exact_count_per_column_block_and_zeros_where_masked(sparsity):
    W, _, H = _layer()
    W_new, mask = sparsegpt_prune(W, H, sparsity, blocksize=64)
    for i1 in range(0, IN, 64):  # blocks of 64, 64, 64 and 8 columns
        width = min(64, IN - i1)
        assert int(mask[:, i1:i1 + width].sum()) == int(OUT * width * sparsity)
    assert (W_new[mask] == 0).all()
    assert (W_new[~mask] != 0).all()
    assert not torch.equal(W_new[~mask], W[~mask])  # the survivors were updated


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6])
def test_lower_output_error_than_magnitude(sparsity):
    W, X, H = _layer()
    W_new, mask = sparsegpt_prune(W, H, sparsity)
    magnitude = W.masked_fill(_magnitude(W, sparsity), 0)
    assert _output_error(W, W_new, X) < 0.8 * _output_error(W, magnitude, X)


def test_reconstruct_with_mask_keeps_mask_and_lowers_error():
    W, X, H = _layer()
    mask = _magnitude(W, 0.5)
    W_new = reconstruct_with_mask(W, H, mask, blocksize=32)
    assert (W_new[mask] == 0).all()
    assert (W_new[~mask] != 0).all()
    zeroed = W.masked_fill(mask, 0)
    assert _output_error(W, W_new, X) < _output_error(W, zeroed, X)


def test_lazy_block_updates_equal_column_by_column():
    W, _, H = _layer()
    mask = _magnitude(W, 0.4)
    torch.testing.assert_close(reconstruct_with_mask(W, H, mask, blocksize=1),
                               reconstruct_with_mask(W, H, mask, blocksize=128), rtol=1e-4, atol=1e-4)


def test_pruning_leading_columns_gives_the_least_squares_optimum():
    """Pruning columns P = 0..c-1 only, the survivors R should solve min ||(W - W') X|| with
    the damped H: with delta_P = -w_P, delta_R = H_RR^-1 H_RP w_P (an independent closed form)."""
    W, _, H = _layer()
    c, percdamp = 5, 0.01
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, :c] = True
    W_new = reconstruct_with_mask(W, H, mask, blocksize=3, percdamp=percdamp)
    Hd = (H + percdamp * H.diagonal().mean() * torch.eye(IN)).double()
    delta = torch.linalg.solve(Hd[c:, c:], Hd[c:, :c] @ W[:, :c].T.double()).T
    torch.testing.assert_close(W_new[:, c:].double(), W[:, c:].double() + delta, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_pattern_is_valid_and_beats_magnitude_n_m(n, m):
    W, X, H = _layer()
    W_new, mask = sparsegpt_prune(W, H, 0.0, blocksize=40, prune_n=n, prune_m=m)
    assert (mask.view(OUT, -1, m).sum(-1) == n).all()
    assert (W_new[mask] == 0).all()
    groups = W.abs().view(OUT, -1, m)
    magnitude_mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        -1, groups.topk(n, dim=-1, largest=False).indices, True).view_as(W)
    assert _output_error(W, W_new, X) < _output_error(W, W.masked_fill(magnitude_mask, 0), X)


def test_dead_inputs_are_zeroed_and_masked_and_the_rest_stays_finite():
    W, X, _ = _layer()
    X[:, [3, 77]] = 0  # two inputs never active during calibration
    H = torch.zeros(IN, IN)
    accumulate_hessian(H, X, 0)
    W_new, mask = sparsegpt_prune(W, H, 0.5)
    assert torch.isfinite(W_new).all()
    assert mask[:, [3, 77]].all() and (W_new[:, [3, 77]] == 0).all()
    kept = reconstruct_with_mask(W, H, torch.zeros_like(mask))
    torch.testing.assert_close(kept, W)  # nothing masked: nothing moves, dead inputs kept


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": 0.5, "prune_n": 4, "prune_m": 4}, "prune_n < prune_m"),
    ({"sparsity": 0.5, "prune_n": 2, "prune_m": 3}, "tile"),
    ({"sparsity": 0.5, "blocksize": 0}, "blocksize"),
    ({"sparsity": 0.5, "percdamp": -1.0}, "percdamp"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    W, _, H = _layer()
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(W, H, **kwargs)


def test_shape_mismatches_are_value_errors():
    W, X, H = _layer()
    with pytest.raises(ValueError, match="accumulate_hessian"):
        sparsegpt_prune(W[:, :10], H, 0.5)
    with pytest.raises(ValueError, match="mask"):
        reconstruct_with_mask(W, H, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        accumulate_hessian(H, X[:, :10], 0)
