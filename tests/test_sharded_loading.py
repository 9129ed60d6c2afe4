"""Sharded loading (FSDP2, 2 gloo ranks): a model built on the meta device, sharded, and
filled with each rank's rows straight from the safetensors files has bit-identical weights
to a plain whole-model load, keeps tied embeddings tied, and holds only its shard."""
from __future__ import annotations

import pytest
import torch

from multiproc import run_ranks

transformers = pytest.importorskip("transformers")

WORLD = 2


def tiny_llama(tied: bool):
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=257,
                                    max_position_embeddings=64, tie_word_embeddings=tied,
                                    bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    """Model configs (as dicts for ModelConfig) of a tied and an untied LLaMA and a TinyGPT."""
    from gradprobe_dist.models import TinyGPT, TinyGPTConfig
    from gradprobe_dist.pipeline.build import save_weights

    found = {}
    for tied in (True, False):
        torch.manual_seed(1)
        out = tmp_path_factory.mktemp(f"llama-tied{tied}")
        transformers.AutoModelForCausalLM.from_config(tiny_llama(tied)).save_pretrained(out)
        found[f"llama-tied{tied}"] = {"kind": "hf", "path": str(out)}
    options = {"vocab_size": 67, "block_size": 16, "n_layer": 3, "n_head": 2, "n_embd": 16, "tie_weights": True}
    path = tmp_path_factory.mktemp("tinygpt") / "model.safetensors"
    save_weights(TinyGPT(TinyGPTConfig.from_dict(options)), path)
    found["tinygpt"] = {"kind": "tinygpt", "path": str(path), "options": options}
    return found


def load_both(rank, world_size, model_dict, dtype):
    """Per parameter: (local shard of the sharded load, the same rows of a plain load)."""
    from torch.distributed.tensor import DTensor

    from gradprobe_dist.parallel.fsdp import FSDPBackend
    from gradprobe_dist.pipeline.build import build_model
    from gradprobe_dist.pipeline.config import ModelConfig

    cfg = ModelConfig(**model_dict, dtype=dtype)
    plain = build_model(cfg)
    sharded = build_model(cfg, FSDPBackend(device="cpu"))
    out, held, total = {}, 0, 0
    for name, param in sharded.named_parameters():
        assert isinstance(param, DTensor), name
        local = param.to_local()
        start = _row_start(param)
        out[name] = (local.clone(), plain.get_parameter(name).detach()[start:start + len(local)].clone())
        held += local.numel()
        total += param.numel()
    buffers = {n: (b.clone(), plain.get_buffer(n).clone()) for n, b in sharded.named_buffers()}
    return {"params": out, "buffers": buffers, "held": held, "total": total,
            "tied": _tied_names(sharded), "plain_tied": _tied_names(plain)}


def load_every_case(rank, world_size, cases):
    return [load_both(rank, world_size, model_dict, dtype) for model_dict, dtype in cases]


def _tied_names(model) -> list[list[str]]:
    """Groups of names that are one Parameter (tied weights)."""
    from gradprobe_dist.parallel.loading import aliases_of

    return sorted(names for names in aliases_of(model).values() if len(names) > 1)


def _row_start(param) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)[1][0]


CASES = [("llama-tiedTrue", "auto"), ("llama-tiedFalse", "auto"), ("tinygpt", "auto"),
         ("llama-tiedTrue", "bfloat16"), ("tinygpt", "bfloat16")]


@pytest.fixture(scope="module")
def loaded(checkpoints):
    by_rank = run_ranks(load_every_case, WORLD, [(checkpoints[w], d) for w, d in CASES], timeout=300)
    return {case: [rank[i] for rank in by_rank] for i, case in enumerate(CASES)}


@pytest.mark.parametrize("which,dtype", CASES)
def test_meta_device_loading_is_bit_identical_to_a_plain_load(loaded, which, dtype):
    ranks = loaded[(which, dtype)]
    for rank, got in enumerate(ranks):
        assert got["params"], "no parameters"
        for name, (local, want) in got["params"].items():
            assert local.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32), name
            assert local.dtype == want.dtype and torch.equal(local, want), f"rank {rank}: {name}"
        for name, (buf, want) in got["buffers"].items():
            assert torch.equal(buf, want), f"rank {rank}: buffer {name}"
        assert got["tied"] == got["plain_tied"], "tied embeddings must stay tied (and untied ones untied)"
        assert bool(got["tied"]) == (which != "llama-tiedFalse")
        # each rank holds about half of every weight: no rank ever held the whole model
        assert got["held"] <= 0.6 * got["total"], (got["held"], got["total"])
    assert sum(r["held"] for r in ranks) == ranks[0]["total"]
