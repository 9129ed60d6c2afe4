"""SparseGPT's adaptive mask (gradprobe_dist.reconstruct.sparsegpt) against a straightforward
transcription of the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt), and the veto."""
import pytest
import torch

from gradprobe_dist.reconstruct.obs import accumulate_hessian
from gradprobe_dist.reconstruct.sparsegpt import lowest_in_rows, sparsegpt_layers, sparsegpt_prune

IN, OUT = 160, 20


def _layer(seed=0, columns=IN, rows=OUT):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, columns)[torch.randperm(columns, generator=gen)]
    X = (torch.randn(900, columns, generator=gen) @ (torch.randn(columns, columns, generator=gen)
                                                      / columns ** 0.5)) * scales
    H = torch.zeros(columns, columns)
    accumulate_hessian(H, X, 0)
    return torch.randn(rows, columns, generator=gen), H, X


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
    """The reference loop, line by line, with two deliberate changes: exactly
    floor(sparsity * numel) per tile, lowest first in row-major order (the reference takes
    ``tmp <= sorted[int(numel * sparsity)]``, one more plus ties), and N:M ties to the lower
    column (a stable sort instead of ``topk``)."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    full_mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(tmp.numel() * sparsity + 1e-6)
            mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
            mask1[torch.sort(tmp.flatten(), stable=True).indices[:k]] = True
            mask1 = mask1.view_as(tmp)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.sort(tmp, dim=1, stable=True).indices[:, :prunen], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, full_mask | dead


@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 128), (0.3, 64), (0.6, 32)])
def test_unstructured_equals_the_reference(sparsity, blocksize):
    W, H, _ = _layer()
    W_new, mask = sparsegpt_prune(W, H, sparsity, blocksize=blocksize)
    W_ref, mask_ref = reference_fasterprune(W, H, sparsity, blocksize=blocksize)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_equals_the_reference(n, m):
    W, H, _ = _layer(1)
    W_new, mask = sparsegpt_prune(W, H, 0.0, blocksize=64, prune_n=n, prune_m=m)
    W_ref, mask_ref = reference_fasterprune(W, H, 0.0, prunen=n, prunem=m, blocksize=64)
    assert torch.equal(mask, mask_ref)
    assert (mask.view(OUT, -1, m).sum(-1) == n).all()
    torch.testing.assert_close(W_new, W_ref, rtol=1e-5, atol=1e-5)


def test_n_m_groups_that_straddle_the_sweeps_steps_equal_the_reference():
    """Groups of 24 columns against obs.STEP = 16: a group must see every earlier column's
    error, also where it starts inside a step."""
    W, H, _ = _layer(2, columns=192)
    W_new, mask = sparsegpt_prune(W, H, 0.0, blocksize=96, prune_n=12, prune_m=24)
    W_ref, mask_ref = reference_fasterprune(W, H, 0.0, prunen=12, prunem=24, blocksize=96)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-5, atol=1e-5)


def test_the_mask_adapts_to_the_updates():
    """The adaptive mask is not the one the dense weights' scores would choose up front."""
    W, H, _ = _layer()
    _, mask = sparsegpt_prune(W, H, 0.5, blocksize=32)
    _, first_block_only = sparsegpt_prune(W, H, 0.5, blocksize=IN)
    assert not torch.equal(mask, first_block_only)


def test_layers_in_lockstep_equal_each_layer_alone():
    layers = [_layer(0), _layer(2, columns=96, rows=7), _layer(3, columns=200, rows=5)]
    together = sparsegpt_layers([W for W, _, _ in layers], [H for _, H, _ in layers], 0.5, blocksize=64)
    for (W, H, _), (W_new, mask) in zip(layers, together):
        alone_W, alone_mask = sparsegpt_prune(W, H, 0.5, blocksize=64)
        assert torch.equal(mask, alone_mask)
        assert torch.equal(W_new, alone_W)


def test_veto_fills_the_quota_with_the_next_weights_in_sparsegpts_order():
    W, H, _ = _layer()
    _, plain = sparsegpt_prune(W, H, 0.5, blocksize=IN)  # one tile: the order is the first scores
    veto = torch.zeros_like(plain)
    veto[plain] = torch.rand(int(plain.sum()), generator=torch.Generator().manual_seed(0)) < 0.2
    _, vetoed = sparsegpt_prune(W, H, 0.5, blocksize=IN, veto=veto)
    assert int(vetoed.sum()) == int(plain.sum())  # the same quota
    assert not (vetoed & veto).any()  # no vetoed weight pruned: enough others exist
    # with one tile, the replacements are the next-lowest scores of the dense weights
    scores = (W ** 2 / torch.diag(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
        H + 0.01 * H.diagonal().mean() * torch.eye(IN))), upper=True)) ** 2).flatten()
    free = scores.masked_fill(veto.flatten(), float("inf"))
    expected = torch.zeros_like(free, dtype=torch.bool)
    expected[torch.sort(free, stable=True).indices[:int(plain.sum())]] = True
    assert torch.equal(vetoed.flatten(), expected)


def test_vetoed_weights_are_pruned_only_when_the_others_run_out():
    W, H, _ = _layer()
    veto = torch.ones_like(W, dtype=torch.bool)
    veto[:, :20] = False  # 20 * 20 = 400 free weights, 0.5 * 20 * 160 = 1600 wanted
    _, mask = sparsegpt_prune(W, H, 0.5, blocksize=IN, veto=veto)
    assert int(mask.sum()) == 1600 and mask[:, :20].all()
    _, plain = sparsegpt_prune(W, H, 0.5, blocksize=IN)
    assert torch.equal(sparsegpt_prune(W, H, 0.5, blocksize=IN, veto=torch.zeros_like(veto))[1], plain)


def test_n_m_veto_keeps_vetoed_weights_unless_a_group_has_too_few_others():
    W, H, _ = _layer()
    _, plain = sparsegpt_prune(W, H, 0.0, prune_n=2, prune_m=4)
    veto = plain.clone()
    veto[:, 4:] = False  # veto what plain SparseGPT prunes in the first group only
    veto[0, 4:8] = True  # and a whole second group of row 0
    _, mask = sparsegpt_prune(W, H, 0.0, prune_n=2, prune_m=4, veto=veto)
    assert (mask.view(OUT, -1, 4).sum(-1) == 2).all()
    assert not (mask[:, :4] & veto[:, :4]).any()
    assert mask[0, 4:8].sum() == 2  # every weight vetoed there: SparseGPT's order decides


def test_lowest_in_rows_orders_vetoed_last_and_ties_to_the_lower_column():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0], [5.0, 4.0, 3.0, 2.0]])
    veto = torch.tensor([[False, True, False, True], [True, True, True, False]])
    assert lowest_in_rows(scores, 2).tolist() == [[False, True, False, True], [False, False, True, True]]
    assert lowest_in_rows(scores, 2, veto).tolist() == [[True, False, True, False], [False, False, True, True]]


def test_bad_veto_and_counts_name_the_problem():
    W, H, _ = _layer()
    with pytest.raises(ValueError, match="veto must be a bool"):
        sparsegpt_prune(W, H, 0.5, veto=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one Hessian"):
        sparsegpt_layers([W, W], [H], 0.5)
