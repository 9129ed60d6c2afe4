"""The frozen prefix of a stage runs once per batch, not once per pass, and the masks do not
change: counted forwards of an earlier block, bit-identical masks with and without the
cache, in one process and on 2 gloo ranks (DDP, FSDP2, ZeRO-3), for TinyGPT and a tiny
Hugging Face LLaMA (whose gradient checkpointing must not change the masks either)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from gradprobe_dist import GradProbe, MagnitudePruning, WandaPruning
from gradprobe_dist.models import TinyGPT, TinyGPTConfig
from gradprobe_dist.parallel import build_backend
from gradprobe_dist.probe.prefix import FrozenPrefix, frozen_prefix_length
from multiproc import run_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")
NUM_BATCHES = 3
TINY = TinyGPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=16)
LATE_BLOCKS = ["blocks.[23].attn.*.weight", "blocks.[23].mlp.*.weight"]


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(TINY)


def _batches(rank: int = 0, world: int = 1) -> list[dict]:
    """Global batches of 4 sequences; each rank feeds its quarter/half of every one."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(NUM_BATCHES):
        ids = torch.randint(0, TINY.vocab_size, (4, TINY.block_size), generator=g)
        part = ids[rank * 4 // world:(rank + 1) * 4 // world]
        out.append({"input_ids": part, "labels": part})
    return out


def _count_forwards(module: nn.Module) -> list[int]:
    """Calls of ``module`` counted as they start (a checkpoint's recompute may stop early,
    inside the module, once it has what the backward needs)."""
    count = [0]
    module.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count


def _probe_late_blocks(mode: str, cache: bool, rank: int = 0, world: int = 1,
                       device: str = "same") -> tuple[dict, list[int]]:
    """Wanda on blocks 2-3 (so blocks 0-1 are the frozen prefix); returns the full masks
    (main rank) and the forward counts of blocks 0, 1 and 2 on this rank."""
    model = _model()
    counts = [_count_forwards(model.blocks[i]) for i in range(3)]
    backend = build_backend(mode, torch.device("cpu"))
    probe = GradProbe(model, WandaPruning(), backend=backend, include=LATE_BLOCKS,
                      cache_prefix=cache, prefix_cache_device=device)
    masks = probe.prune(_batches(rank, world), None, sparsity=0.5, num_batches=NUM_BATCHES,
                        gradient_threshold=0.05)
    full = {n: backend.gather_full(n, m) for n, m in masks.items()}
    backend.close()
    return full, [c[0] for c in counts]


def test_prefix_length_is_the_blocks_before_the_first_probed_one():
    model = _model()
    names = lambda *blocks: [n for n, _ in model.named_parameters()
                             if any(n.startswith(f"blocks.{b}.") for b in blocks) and n.endswith("weight")]
    assert frozen_prefix_length(model, names(2, 3)) == 2
    assert frozen_prefix_length(model, names(3)) == 3
    assert frozen_prefix_length(model, names(0, 3)) == 0
    # a probed weight outside the block list could feed the blocks: nothing is cached
    assert frozen_prefix_length(model, names(2) + ["pos_emb.weight"]) == 0
    assert FrozenPrefix(model, names(3), enabled=False).length == 0


@pytest.mark.parametrize("device", ["same", "cpu"])
def test_one_process_runs_the_prefix_once_per_batch_with_the_same_masks(device):
    cached, cached_counts = _probe_late_blocks("none", True, device=device)
    plain, plain_counts = _probe_late_blocks("none", False)
    assert plain_counts == [2 * NUM_BATCHES] * 3  # both passes, every block
    assert cached_counts == [NUM_BATCHES, NUM_BATCHES, 2 * NUM_BATCHES]  # prefix: baseline pass only
    assert cached.keys() == plain.keys() and cached
    for name in plain:
        assert torch.equal(cached[name], plain[name]), name
    assert any(m.any() for m in plain.values()) and not all(m.all() for m in plain.values())


def test_the_model_gets_its_blocks_back_and_the_cache_is_not_reused_for_other_data():
    model = _model()
    blocks = list(model.blocks)
    probe = GradProbe(model, MagnitudePruning(), include=LATE_BLOCKS)
    probe.prune(_batches(), None, sparsity=0.5, num_batches=NUM_BATCHES)
    assert list(model.blocks) == blocks
    with pytest.raises(RuntimeError, match="no recorded prefix output for calibration batch 0"):
        with FrozenPrefix(model, [n for n in probe.param_names]).replaying():
            model(**_batches()[0])
    assert list(model.blocks) == blocks


def _ranks(rank, world, mode):
    cached, cached_counts = _probe_late_blocks(mode, True, rank, world)
    plain, plain_counts = _probe_late_blocks(mode, False, rank, world)
    return cached, cached_counts, plain, plain_counts


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero3"])
def test_two_ranks_run_the_prefix_once_per_batch_with_the_same_masks(mode):
    results = run_ranks(_ranks, 2, mode, timeout=900, env={"DS_ACCELERATOR": "cpu"})
    for cached, cached_counts, plain, plain_counts in results:
        assert plain_counts == [2 * NUM_BATCHES] * 3
        assert cached_counts == [NUM_BATCHES, NUM_BATCHES, 2 * NUM_BATCHES]
    cached, _, plain, _ = results[0]
    assert cached.keys() == plain.keys() and cached
    for name in plain:
        assert torch.equal(cached[name], plain[name]), name


# -- the staged job: the frozen prefix of each stage runs once per batch -----------------------
def _job_block0_forwards(config_path: str, cache: bool, parallel: str) -> tuple[int, dict]:
    """Run the 3-stage job (one block per stage); forwards of block 0 on this rank, and the
    masks it wrote (main rank)."""
    from gradprobe_dist.checkpoint.store import load_masks
    from gradprobe_dist.pipeline.config import load_config
    from gradprobe_dist.pipeline.job import PruneJob
    from gradprobe_dist.runtime.env import init_distributed

    out = f"{config_path}.{parallel}.{cache}"
    cfg = load_config(config_path, [f"prune.cache_prefix={str(cache).lower()}", f"parallel={parallel}",
                                    f"output_dir={out}"])
    env = init_distributed(device="cpu")
    with PruneJob(cfg, env, show_progress=False) as job:
        count = _count_forwards(job.model.blocks[0])
        job.run(restart=True)
    return count[0], load_masks(out) if env.is_main else None


def _job_ranks(rank, world, config_path, parallel):
    return [_job_block0_forwards(config_path, cache, parallel) for cache in (True, False)]


@pytest.fixture(scope="module")
def job_config(tmp_path_factory):
    from test_pipeline import make_tiny_data, write_config

    root = tmp_path_factory.mktemp("job")
    return str(write_config(root / "run.yaml", make_tiny_data(root), output_dir=root / "masks",
                            prune={"strategy": "wanda", "gradient_threshold": 0.05}))


def _check_job(results, num_batches: int) -> None:
    (cached_count, cached), (plain_count, plain) = results
    # block 0: probed in stage 1 (both passes), the frozen prefix of stages 2 and 3
    assert plain_count == 3 * 2 * num_batches
    assert cached_count == (2 + 1 + 1) * num_batches
    assert cached.keys() == plain.keys() and len(cached) == 12
    for name in plain:
        assert torch.equal(cached[name], plain[name]), name


def test_staged_job_in_one_process_runs_each_prefix_once_per_batch(job_config):
    _check_job([_job_block0_forwards(job_config, cache, "none") for cache in (True, False)], 4)


@pytest.mark.parametrize("parallel", ["fsdp", "zero3"])
def test_staged_job_on_two_ranks_runs_each_prefix_once_per_batch(job_config, parallel):
    ranks = run_ranks(_job_ranks, 2, job_config, parallel, timeout=900, env={"DS_ACCELERATOR": "cpu"})
    _check_job(ranks[0], 4)  # each rank feeds its own 4 micro-batches
    assert [count for count, _ in ranks[1]] == [count for count, _ in ranks[0]]


# -- a Hugging Face LLaMA: the prefix cache and gradient checkpointing ------------------------
def _hf_llama_dir(root) -> str:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=TINY.block_size, attention_dropout=0.5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    return str(root)


def _probe_hf(path: str, checkpointing: bool, cache: bool, mode: str = "none", rank: int = 0,
              world: int = 1):
    """Wanda on layers 2-3; full masks, forwards of layer 0 and of layer 3's MLP, and the
    training flags layer 3's attention saw (dropout must stay off)."""
    from gradprobe_dist.pipeline.build import build_model
    from gradprobe_dist.pipeline.config import ModelConfig

    model = build_model(ModelConfig(kind="hf", path=path, gradient_checkpointing=checkpointing))
    layers = model.model.layers
    prefix_runs, mlp_runs, attn_modes = _count_forwards(layers[0]), _count_forwards(layers[3].mlp), []
    layers[3].self_attn.register_forward_hook(lambda m, a, o: attn_modes.append(m.training))
    backend = build_backend(mode, torch.device("cpu"))
    probe = GradProbe(model, WandaPruning(), backend=backend, cache_prefix=cache,
                      include=["model.layers.[23].*"])
    masks = probe.prune(_batches(rank, world), None, sparsity=0.5, num_batches=NUM_BATCHES,
                        gradient_threshold=0.05)
    full = {n: backend.gather_full(n, m) for n, m in masks.items()}
    backend.close()
    return full, prefix_runs[0], mlp_runs[0], set(attn_modes)


def test_gradient_checkpointing_recomputes_in_eval_mode_and_keeps_the_masks(tmp_path):
    path = _hf_llama_dir(tmp_path / "llama")
    plain, plain_prefix, plain_mlp, plain_modes = _probe_hf(path, False, False)
    checked, checked_prefix, checked_mlp, checked_modes = _probe_hf(path, True, True)
    assert plain_mlp == 2 * NUM_BATCHES  # one forward per batch per pass
    assert checked_mlp == 2 * 2 * NUM_BATCHES  # and its recompute in each backward
    assert plain_prefix == 2 * NUM_BATCHES and checked_prefix == NUM_BATCHES  # prefix cached
    assert plain_modes == checked_modes == {False}  # the attention's dropout stayed off
    assert plain.keys() == checked.keys() and len(plain) == 14
    for name in plain:
        assert torch.equal(checked[name], plain[name]), name


def test_gradient_checkpointing_is_refused_for_built_in_models():
    from gradprobe_dist.pipeline.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="model.gradient_checkpointing needs model.kind=hf"):
        ModelConfig(kind="tinygpt", gradient_checkpointing=True)


def _hf_ranks(rank, world, path):
    return _probe_hf(path, True, True, "fsdp", rank, world)[:3], _probe_hf(path, False, False, "fsdp", rank, world)[:3]


def test_gradient_checkpointing_and_prefix_cache_under_fsdp_keep_the_masks(tmp_path):
    path = _hf_llama_dir(tmp_path / "llama")
    (checked, checked_prefix, checked_mlp), (plain, plain_prefix, plain_mlp) = \
        run_ranks(_hf_ranks, 2, path, timeout=900)[0]
    assert (checked_prefix, checked_mlp) == (NUM_BATCHES, 4 * NUM_BATCHES)
    assert (plain_prefix, plain_mlp) == (2 * NUM_BATCHES, 2 * NUM_BATCHES)
    for name in plain:
        assert torch.equal(checked[name], plain[name]), name
