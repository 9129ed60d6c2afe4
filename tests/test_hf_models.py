"""Hugging Face causal LMs (GPT-2, GPT-Neo, LLaMA) in every parallel mode, and their export.

Tiny random configs are saved with ``save_pretrained`` and loaded the way a run loads them
(``factory.build_model`` with ``model.kind: hf``); nothing is downloaded. GPT-2 stores its
projections transposed (``transformers`` ``Conv1D``, weight [in, out]), so Wanda's "per
output feature" is a column there: the unit tests pin that down on every layout a backend
can hand out, and the parallel runs check DDP, FSDP2 and ZeRO-3 (2 gloo ranks) against one
process fed the same global batches (``global_reference_batches``).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from multiproc import run_ranks

transformers = pytest.importorskip("transformers")

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ENV = {"DS_ACCELERATOR": "cpu"}
WORLD = 2
MICRO = 2  # per rank; the reference runs the global batch of WORLD * MICRO
NUM_BATCHES = 2
SEQ_LEN = 32
SPARSITY = 0.5
MODES = ["ddp", "fsdp", "zero3"]
# Ranks sum activation norms and average gradients in another float order than one process,
# so a score or ratio sitting at a decision boundary may fall the other way; nothing more.
MIN_AGREEMENT = 0.999


def tiny_config(arch: str):
    common = dict(vocab_size=256, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2, **common)
    if arch == "gpt_neo":  # the TinyStories-33M architecture: alternating global/local attention
        return transformers.GPTNeoConfig(max_position_embeddings=SEQ_LEN, hidden_size=32, num_layers=2,
                                         num_heads=2, attention_types=[[["global", "local"], 1]],
                                         window_size=8, **common)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=SEQ_LEN, **common)


ARCHS = ["gpt2", "gpt_neo", "llama"]
BLOCK_LISTS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "llama": "model.layers"}
PROJECTIONS = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gpt_neo": ["attn.attention.k_proj", "attn.attention.v_proj", "attn.attention.q_proj",
                "attn.attention.out_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def expected_prunable(arch: str) -> list[str]:
    return [f"{BLOCK_LISTS[arch]}.{block}.{proj}.weight" for block in range(2) for proj in PROJECTIONS[arch]]


def load(path: str) -> nn.Module:
    from gradprobe_dist.pipeline.config import ModelConfig
    from gradprobe_dist.pipeline.build import build_model

    return build_model(ModelConfig(kind="hf", path=path))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
        dirs[arch] = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(dirs[arch])
    return dirs


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> str:
    from gradprobe_dist.data.shards import bundled_text_path, write_text_shards

    out = tmp_path_factory.mktemp("calib")
    write_text_shards([bundled_text_path()], out, seq_len=SEQ_LEN, samples_per_shard=MICRO * NUM_BATCHES,
                      max_samples=WORLD * MICRO * NUM_BATCHES)
    return str(out)


# -- which weights, and Wanda's transposed layout (one process) ------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_prunable_weights_are_the_attention_and_mlp_projections(model_dirs, arch):
    from gradprobe_dist.probe.params import find_prunable, stores_transposed

    model = load(model_dirs[arch])
    owners = find_prunable(model)
    assert list(owners) == expected_prunable(arch)  # no embeddings, head, norms or biases
    assert all(stores_transposed(m) == (arch == "gpt2") for m in owners.values())
    assert model.get_output_embeddings() not in owners.values()


def _conv1d_and_linear_twins():
    """The same two-layer network built from Conv1D ([in, out] weights) and nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(9, 6), nn.ReLU(), Conv1D(4, 9))
    linear = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
    with torch.no_grad():
        for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
            lin.weight.copy_(c.weight.T)
            lin.bias.copy_(c.bias)
    return conv, linear


def test_wanda_on_conv1d_selects_per_output_column_like_the_linear_twin():
    from gradprobe_dist import GradProbe, WandaPruning

    conv, linear = _conv1d_and_linear_twins()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen)) for _ in range(2)]
    records = [GradProbe(model, WandaPruning()).probe(batches, nn.CrossEntropyLoss(), 0.5, 2, 0.1)
               for model in (conv, linear)]
    for name, inputs in (("0.weight", 6), ("2.weight", 9)):
        conv_mask, linear_mask = records[0].layers[name].tentative, records[1].layers[name].tentative
        assert conv_mask.shape == linear_mask.T.shape
        assert torch.equal(conv_mask, linear_mask.T)
        assert (conv_mask.sum(0) == inputs // 2).all()  # exactly k per output feature (column)
        assert conv_mask.sum(1).unique().numel() > 1  # not per stored row


def _shards(full_shape, layout: str, parts: int):
    """The LocalSlices a backend would hand out: FSDP2 row blocks or ZeRO-3 flat pieces."""
    from gradprobe_dist.parallel.base import LocalSlice

    shape = torch.Size(full_shape)
    if layout == "rows":
        bounds = torch.tensor([len(c) for c in torch.arange(shape[0]).chunk(parts)]).cumsum(0).tolist()
        bounds += [shape[0]] * (parts - len(bounds))  # a rank past the end holds no rows
        return [LocalSlice(shape, "rows", lo, hi) for lo, hi in zip([0] + bounds[:-1], bounds)]
    step = -(-shape.numel() // parts)
    return [LocalSlice(shape, "flat", min(i * step, shape.numel()), min((i + 1) * step, shape.numel()))
            for i in range(parts)]


@pytest.mark.parametrize("transposed,shape", [(True, (6, 10)), (False, (10, 6)), (False, (4, 3, 2))])
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_wanda_scores_of_local_parts_tile_the_full_scores(transposed, shape, layout):
    from gradprobe_dist.parallel.base import LocalSlice
    from gradprobe_dist.strategies.wanda import input_norms, wanda_scores

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    features = shape[0] if transposed else shape[1]
    sq_norms = torch.rand(features, generator=gen) + 0.1
    full = wanda_scores(weight, sq_norms, LocalSlice(weight.shape, "full"), transposed)
    norms = input_norms(sq_norms, weight.shape, transposed)
    if transposed:  # input feature i is row i of the stored [in, out] weight
        direct = weight.abs() * norms[:, None]
    else:  # input position j is column j of the weight flattened to [out, -1]
        direct = (weight.abs().reshape(shape[0], -1) * norms).reshape(shape)
    torch.testing.assert_close(full, direct, rtol=0, atol=0)
    pieces = []
    for where in _shards(weight.shape, layout, parts=3 if layout == "flat" else 4):  # 4 > rows of (4,3,2)
        lo, hi = where.flat_range()
        local = weight.reshape(-1)[lo:hi]
        if layout == "rows":
            local = local.reshape(where.stop - where.start, *shape[1:])
        pieces.append(wanda_scores(local, sq_norms, where, transposed).reshape(-1))
    assert torch.equal(torch.cat(pieces), full.reshape(-1))


def test_conv1d_input_norms_are_summed_over_every_token():
    from transformers.pytorch_utils import Conv1D

    from gradprobe_dist.strategies.activations import collect_input_sq_norms

    layer = Conv1D(5, 3)
    x = torch.randn(2, 4, 3)
    with collect_input_sq_norms({"w": layer}) as norms:
        layer(x)
        layer(x[:1])
    torch.testing.assert_close(norms["w"], x.pow(2).sum((0, 1)) + x[:1].pow(2).sum((0, 1)))


# -- every parallel mode against one process ---------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def prune_arch(model, backend, batches) -> dict:
    """Wanda + probe; tentative and final masks gathered on the main rank, plus this rank's
    check that pruned entries are 0 and every other entry is bit-identical."""
    from gradprobe_dist import GradProbe, WandaPruning

    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = GradProbe(model, WandaPruning(), backend=backend)
    record = probe.probe(batches, None, SPARSITY, NUM_BATCHES, 0.1)
    masks = probe.apply_decisions(record, 0.0)
    out = {"names": probe.param_names, "pruned_nonzero": 0, "kept_changed": 0, "checked": 0,
           "tentative": {n: backend.gather_full(n, layer.tentative) for n, layer in record.layers.items()},
           "masks": {n: backend.gather_full(n, m) for n, m in masks.items()},
           "sparsity": probe.get_sparsity()}
    for name, mask in masks.items():
        start, stop = backend.local_slice(name).flat_range()
        original = originals[name].reshape(-1)[start:stop]  # whole weights: loaded before sharding
        local, mask = backend.local_weight(name).reshape(-1), mask.reshape(-1)
        out["pruned_nonzero"] += int((local[mask] != 0).sum())
        out["kept_changed"] += int((bits(local[~mask]) != bits(original[~mask])).sum())
        out["checked"] += local.numel()
    return out


def prune_every_arch(rank, world_size, mode, shard_dir, model_dirs):
    from torch.distributed.fsdp import FSDPModule

    from gradprobe_dist.parallel import build_backend
    from gradprobe_dist.data.loader import shard_batches

    batches = shard_batches(shard_dir, micro_batch_size=MICRO, num_batches=NUM_BATCHES,
                                  rank=rank, world_size=world_size)
    results = {}
    for arch in ARCHS:
        model = load(model_dirs[arch])
        backend = build_backend(mode, torch.device("cpu"), micro_batch_size=MICRO)
        results[arch] = prune_arch(model, backend, batches)
        results[arch]["fsdp_units"] = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    return results


@pytest.fixture(scope="module")
def reference(model_dirs, shard_dir):
    from gradprobe_dist.parallel.local import LocalBackend
    from references import global_reference_batches

    batches = global_reference_batches(shard_dir, micro_batch_size=MICRO, num_batches=NUM_BATCHES,
                                       world_size=WORLD)
    return {arch: prune_arch(load(model_dirs[arch]), LocalBackend(), batches) for arch in ARCHS}


@pytest.fixture(scope="module", params=MODES)
def ranks(request, shard_dir, model_dirs):
    return request.param, run_ranks(prune_every_arch, WORLD, request.param, shard_dir, model_dirs,
                                    timeout=300, env=ENV)


def agreement(got: dict, want: dict) -> float:
    differ = sum(int((got[n] != want[n]).sum()) for n in want)
    return 1 - differ / sum(m.numel() for m in want.values())


def test_one_process_prunes_exactly_the_tentative_subset(reference):
    for arch, out in reference.items():
        assert out["names"] == expected_prunable(arch)
        assert out["pruned_nonzero"] == 0 and out["kept_changed"] == 0
        pruned = sum(int(m.sum()) for m in out["masks"].values())
        tentative = sum(int(m.sum()) for m in out["tentative"].values())
        assert 0 < pruned < tentative, arch  # the probe restored some of the selection
        assert all(not (m & ~out["tentative"][n]).any() for n, m in out["masks"].items())


@pytest.mark.timeout(400)
@pytest.mark.parametrize("arch", ARCHS)
def test_masks_match_one_process_on_the_global_batches(ranks, reference, arch):
    mode, outs = ranks
    main, want = outs[0][arch], reference[arch]
    assert main["names"] == want["names"] == expected_prunable(arch)
    assert all(m is None for m in outs[1][arch]["masks"].values())  # gathered on rank 0 only
    tentative, final = agreement(main["tentative"], want["tentative"]), agreement(main["masks"], want["masks"])
    print(f"{mode}/{arch}: tentative agreement {tentative:.5f}, final agreement {final:.5f}")
    assert tentative >= MIN_AGREEMENT and final >= MIN_AGREEMENT
    for out in outs:
        assert out[arch]["sparsity"] == pytest.approx(want["sparsity"], abs=5e-4)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_rank_zeroes_pruned_and_keeps_the_rest(ranks, arch):
    mode, outs = ranks
    total = sum(m.numel() for m in outs[0][arch]["masks"].values())
    for out in outs:
        assert out[arch]["pruned_nonzero"] == 0 and out[arch]["kept_changed"] == 0
    checked = sum(out[arch]["checked"] for out in outs)
    assert checked == (WORLD * total if mode == "ddp" else total)  # the shards cover each weight once


@pytest.mark.timeout(400)
def test_fsdp_shards_each_transformer_block(ranks):
    mode, outs = ranks
    for arch in ARCHS:
        units = outs[0][arch]["fsdp_units"]
        blocks = [f"{BLOCK_LISTS[arch]}.{i}" for i in range(2)]
        assert units == (sorted(["", *blocks]) if mode == "fsdp" else []), (mode, arch)


# -- export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_writes_a_pruned_model_that_plain_transformers_reloads(tmp_path, model_dirs, shard_dir, arch):
    import yaml

    from gradprobe_dist.checkpoint.store import load_masks
    from gradprobe_dist.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"kind": "hf", "path": model_dirs[arch]},
        "data": {"shards": shard_dir, "micro_batch_size": MICRO},
        "prune": {"strategy": "wanda", "sparsity": SPARSITY, "num_batches": NUM_BATCHES},
        "output_dir": str(tmp_path / "masks"), "device": "cpu"}))
    assert main(["prune", "--config", str(config), "--quiet"]) == 0
    assert main(["export", "--config", str(config), "--masks", str(tmp_path / "masks"),
                 "--out", str(tmp_path / "pruned")]) == 0

    assert (tmp_path / "pruned" / "model.safetensors").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    original = dict(load(model_dirs[arch]).named_parameters())
    masks = load_masks(tmp_path / "masks")
    assert sorted(masks) == sorted(expected_prunable(arch))
    assert sum(int(m.sum()) for m in masks.values()) > 0
    for name, param in exported.named_parameters():
        want = original[name].detach()
        if name in masks:
            want = want.masked_fill(masks[name], 0)
        assert torch.equal(param.detach(), want), name  # exactly the masked zeros, nothing else moved
