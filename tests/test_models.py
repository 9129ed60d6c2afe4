"""Built-in models: shapes, the shifted causal-LM loss, causality, weight tying, config checks, trainability."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from multiproc import run_ranks  # noqa: E402

from gradprobe_dist.models import CausalLMOutput, SimpleMLP, TinyGPT, TinyGPTConfig  # noqa: E402

SMALL = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def small_gpt(seed: int = 0, **overrides) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(**{**SMALL, **overrides})).eval()


def random_ids(batch: int = 3, seq: int = 12, vocab: int = SMALL["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- TinyGPT


def test_default_config_matches_the_documented_sizes():
    cfg = TinyGPTConfig()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (256, 128, 4, 4, 128)
    assert (cfg.dropout, cfg.bias, cfg.tie_weights) == (0.0, True, True)


def test_logits_shape_and_no_loss_without_labels():
    model = small_gpt()
    out = model(random_ids(batch=3, seq=12))
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (3, 12, SMALL["vocab_size"])
    assert out.loss is None


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = small_gpt()
    ids = random_ids(batch=2, seq=10)
    labels = ids.clone()
    labels[0, 4] = -100
    labels[1, 7:] = -100
    out = model(ids, labels=labels)

    logits = out.logits
    expected_terms = []
    for b in range(ids.shape[0]):  # reference written position by position on purpose
        for t in range(ids.shape[1] - 1):
            target = labels[b, t + 1]
            if target != -100:
                expected_terms.append(-F.log_softmax(logits[b, t], dim=-1)[target])
    expected = torch.stack(expected_terms).mean()
    assert out.loss.shape == ()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # Unshifted cross-entropy would be a different number: the shift really happens.
    unshifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert not torch.allclose(out.loss, unshifted)


def test_called_with_an_unpacked_batch_dict():
    model = small_gpt()
    ids = random_ids()
    by_keywords = model(**{"input_ids": ids, "labels": ids})
    positional = model(ids, ids)
    torch.testing.assert_close(by_keywords.loss, positional.loss, rtol=0, atol=0)
    torch.testing.assert_close(by_keywords.logits, positional.logits, rtol=0, atol=0)


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = small_gpt()
    ids = random_ids(batch=2, seq=12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % SMALL["vocab_size"]
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 7:], before[:, 7:])


def test_lm_head_is_tied_to_the_token_embedding():
    tied, untied = small_gpt(), small_gpt(tie_weights=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    # The tied weight is one parameter: counted once, and trained through both uses.
    table = SMALL["vocab_size"] * SMALL["n_embd"]
    assert untied.num_parameters() - tied.num_parameters() == table
    assert tied.num_parameters() == sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())


def test_num_parameters_counts_every_distinct_weight():
    model = small_gpt(tie_weights=False)
    v, t, c, layers = SMALL["vocab_size"], SMALL["block_size"], SMALL["n_embd"], SMALL["n_layer"]
    per_block = (2 * 2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    expected = v * c + t * c + layers * per_block + 2 * c + c * v
    assert model.num_parameters() == expected


def test_block_structure_exposes_named_linears():
    model = small_gpt()
    assert len(model.blocks) == SMALL["n_layer"]
    c = SMALL["n_embd"]
    block = model.blocks[0]
    assert block.attn.qkv.weight.shape == (3 * c, c)
    assert block.attn.proj.weight.shape == (c, c)
    assert block.mlp.fc.weight.shape == (4 * c, c)
    assert block.mlp.proj.weight.shape == (c, 4 * c)
    assert small_gpt(bias=False).blocks[0].attn.qkv.bias is None


def test_init_is_deterministic_given_the_seed_and_follows_nanogpt_scales():
    a, b, c = small_gpt(seed=3), small_gpt(seed=3), small_gpt(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)

    big = TinyGPT(TinyGPTConfig(n_layer=2))  # enough elements for the std to be measured tightly
    assert abs(big.blocks[0].mlp.fc.weight.std().item() - 0.02) < 1e-3
    assert abs(big.blocks[0].mlp.proj.weight.std().item() - 0.02 / 2.0) < 1e-3  # 0.02 / sqrt(2 * n_layer)
    assert torch.count_nonzero(big.blocks[0].attn.qkv.bias) == 0


def test_config_from_a_dict_rejects_unknown_keys():
    assert TinyGPTConfig(**SMALL) == TinyGPTConfig.from_dict(SMALL)
    with pytest.raises(TypeError, match="n_embed"):
        TinyGPTConfig(**{**SMALL, "n_embed": 16})
    with pytest.raises(TypeError, match=r"unknown TinyGPTConfig keys \['n_embed'\].*valid keys"):
        TinyGPTConfig.from_dict({**SMALL, "n_embed": 16})


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"n_embd": 10, "n_head": 4}, ValueError, "divisible by n_head"),
        ({"n_layer": 0}, ValueError, "n_layer must be positive"),
        ({"vocab_size": 2.5}, TypeError, "vocab_size must be an int"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"tie_weights": "yes"}, TypeError, "tie_weights must be true or false"),
    ],
)
def test_config_rejects_bad_values_with_a_named_field(overrides, error, message):
    with pytest.raises(error, match=message):
        TinyGPTConfig(**{**SMALL, **overrides})


def test_forward_rejects_bad_inputs():
    model = small_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(seq=SMALL["block_size"] + 1))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="labels shape"):
        model(random_ids(seq=6), labels=random_ids(seq=5))


def test_adamw_steps_lower_the_lm_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(**SMALL, dropout=0.1)).train()
    ids = random_ids(batch=4, seq=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# ---------------------------------------------------------------- SimpleMLP


def test_mlp_defaults_follow_the_original_readme():
    model = SimpleMLP()
    assert [(layer.in_features, layer.out_features) for layer in model.layers] == [(784, 512), (512, 256)]
    assert (model.head.in_features, model.head.out_features) == (256, 10)
    assert model(torch.rand(5, 784)).shape == (5, 10)


def test_mlp_flattens_image_shaped_inputs():
    torch.manual_seed(0)
    model = SimpleMLP(input_dim=12, hidden_dims=[8, 6, 4], output_dim=3)
    images = torch.rand(4, 1, 3, 4)
    out = model(images)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, model(images.reshape(4, 12)), rtol=0, atol=0)
    # Logits, not probabilities: rows need not sum to one and can be negative.
    assert not torch.allclose(out.sum(dim=1), torch.ones(4))


def test_mlp_hidden_layers_apply_relu():
    model = SimpleMLP(input_dim=2, hidden_dims=[2], output_dim=1)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(2))
        model.layers[0].bias.zero_()
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    out = model(torch.tensor([[3.0, -5.0]]))
    assert out.item() == 3.0  # the -5 is cut by ReLU; a purely linear stack would give -2


def test_mlp_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="hidden_dims\\[1\\] must be positive"):
        SimpleMLP(hidden_dims=[8, 0])
    with pytest.raises(TypeError, match="input_dim must be an int"):
        SimpleMLP(input_dim=7.5)
    with pytest.raises(ValueError, match="input_dim=6"):
        SimpleMLP(input_dim=8)(torch.rand(2, 6))


def test_adamw_steps_lower_the_mlp_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = SimpleMLP(input_dim=20, hidden_dims=(32, 16), output_dim=4, dropout=0.1).train()
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- FSDP2 compatibility


def _fsdp2_loss_and_grads(rank, world_size):
    """Shard each block and the root with FSDP2; return the loss and the full gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = small_gpt(seed=5).train()
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = random_ids(batch=2, seq=8)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # numpy, not tensors: torch's queue would share storage with a process that is exiting
    grads = {name: p.grad.full_tensor().numpy() for name, p in model.named_parameters()}
    return loss.item(), grads


def test_fsdp2_per_block_sharding_matches_one_process():
    model = small_gpt(seed=5).train()
    ids = random_ids(batch=2, seq=8)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}

    for rank_loss, rank_grads in run_ranks(_fsdp2_loss_and_grads, 2, timeout=120):
        assert rank_loss == pytest.approx(loss.item(), rel=1e-5)
        assert rank_grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(torch.from_numpy(rank_grads[name]), grad, rtol=1e-4, atol=1e-6, msg=name)
