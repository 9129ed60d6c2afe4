"""Sharded loading (FSDP2 and ZeRO-3, 2 gloo ranks): a model built on the meta device,
sharded, and filled with each rank's part straight from the safetensors files has
bit-identical weights to a plain whole-model load, keeps tied embeddings tied, and holds
only its shard. Under ZeRO-3 the engine then takes the partitions as they are: it moves no
weight between ranks and computes what the plain model computes."""
from __future__ import annotations

import pytest
import torch

from multiproc import run_ranks

transformers = pytest.importorskip("transformers")

WORLD = 2
ZERO3_ENV = {"DS_ACCELERATOR": "cpu"}


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


def zero3_load_both(rank, world_size, model_dict, dtype, sharded=True):
    """Per parameter: (this rank's ZeRO-3 partition, padding included, the same flat range of
    a plain load), the main rank's gathered weight, and what ``deepspeed.initialize`` (the
    backend's first ``prepare``) moved between ranks."""
    from gradprobe_dist.parallel.zero3 import Zero3Backend
    from gradprobe_dist.pipeline.build import build_model
    from gradprobe_dist.pipeline.config import ModelConfig
    from gradprobe_dist.probe.params import find_prunable

    cfg = ModelConfig(**model_dict, dtype=dtype)
    plain = build_model(cfg)
    backend = Zero3Backend(device="cpu")
    model = build_model(cfg, backend if sharded else None)
    out = {"params": {}, "gathered": {}, "held": 0, "total": 0}
    if sharded:
        for name, param in model.named_parameters():
            start, stop = _flat_partition(param.ds_numel, rank)
            flat = plain.get_parameter(name).detach().flatten()
            out["params"][name] = (param.ds_tensor.clone(), flat[start:stop].clone())
            out["held"] += param.ds_tensor.numel()
            out["total"] += param.ds_numel
            full = backend.gather_parameter(param)
            out["gathered"][name] = None if full is None else full.clone()
        out["buffers"] = {n: (b.clone(), plain.get_buffer(n).clone()) for n, b in model.named_buffers()}
        out["tied"], out["plain_tied"] = _tied_names(model), _tied_names(plain)
    ids_before = {n: getattr(p, "ds_id", None) for n, p in model.named_parameters()}
    with _param_traffic() as calls:
        engine = backend.prepare(model, list(find_prunable(model)))
    out["broadcast_bytes"] = sum(size for name, size in calls if name == "broadcast")
    out["largest_gather"] = max((size for name, size in calls if name != "broadcast"), default=0)
    sizes = [p.ds_numel * p.element_size() for p in model.parameters()]
    out["largest_param"], out["model_bytes"] = max(sizes), sum(sizes)
    if sharded:
        out["same_ids"] = ids_before == {n: p.ds_id for n, p in model.named_parameters()}
        out["left_gathered"] = [n for n, p in model.named_parameters() if p.numel() > 0]
        out["after_initialize"] = {n: p.ds_tensor.clone() for n, p in model.named_parameters()}
        ids = torch.arange(3, 11).remainder(60).unsqueeze(0)
        with torch.no_grad():
            out["logits"] = (engine(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float())
    backend.close()
    return out


def zero3_every_case(rank, world_size, cases):
    return [zero3_load_both(rank, world_size, *case) for case in cases]


def _flat_partition(numel: int, rank: int) -> tuple[int, int]:
    """ZeRO-3's cut of ``weight.flatten()``: equal parts of the size padded to WORLD."""
    part = -(-numel // WORLD)
    return min(rank * part, numel), min((rank + 1) * part, numel)


class _param_traffic:
    """Records ``(collective, bytes of its largest tensor)`` for every broadcast and all-gather
    through deepspeed.comm or torch.distributed (what partitioning or gathering parameters
    sends) while the context is open."""

    NAMES = {"deepspeed.comm": ("broadcast", "all_gather", "all_gather_into_tensor", "allgather_fn",
                                "all_gather_coalesced"),
             "torch.distributed": ("broadcast", "all_gather", "all_gather_into_tensor")}

    def __enter__(self):
        import importlib

        self.calls, self.saved = [], []
        for module_name, names in self.NAMES.items():
            module = importlib.import_module(module_name)
            for name in names:
                real = getattr(module, name)
                self.saved.append((module, name, real))
                setattr(module, name, self._recording(name, real))
        return self.calls

    def _recording(self, name, real):
        def recorded(*args, **kwargs):
            tensors = [t for value in (*args, *kwargs.values())
                       for t in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(t, torch.Tensor)]
            self.calls.append((name, max((t.numel() * t.element_size() for t in tensors), default=0)))
            return real(*args, **kwargs)
        return recorded

    def __exit__(self, *exc):
        for module, name, real in self.saved:
            setattr(module, name, real)


ZERO3_CASES = [("llama-tiedTrue", "auto"), ("llama-tiedFalse", "auto"), ("tinygpt", "auto"),
               ("llama-tiedTrue", "bfloat16")]


@pytest.fixture(scope="module")
def zero3_loaded(checkpoints):
    cases = [(checkpoints[w], d) for w, d in ZERO3_CASES] + [(checkpoints["llama-tiedTrue"], "auto", False)]
    by_rank = run_ranks(zero3_every_case, WORLD, cases, timeout=600, env=ZERO3_ENV)
    loaded = {case: [rank[i] for rank in by_rank] for i, case in enumerate(ZERO3_CASES)}
    loaded["plain"] = [rank[-1] for rank in by_rank]
    return loaded


@pytest.mark.parametrize("which,dtype", ZERO3_CASES)
def test_zero3_sharded_loading_is_bit_identical_to_a_plain_load(zero3_loaded, which, dtype):
    ranks = zero3_loaded[(which, dtype)]
    want_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    for rank, got in enumerate(ranks):
        assert got["params"], "no parameters"
        for name, (part, want) in got["params"].items():
            assert part.dtype == want.dtype == want_dtype, name
            assert torch.equal(part[:len(want)], want), f"rank {rank}: {name}"
            assert not part[len(want):].any(), f"rank {rank}: {name}: the padding must be zeros"
            # the engine kept the partitions as loaded
            assert torch.equal(got["after_initialize"][name], part), f"rank {rank}: {name} changed"
            full = got["gathered"][name]
            if rank == 0:
                assert full is not None and torch.equal(full.flatten()[:len(want)], want), name
            else:
                assert full is None
        for name, (buf, want) in got["buffers"].items():
            assert buf.dtype == want.dtype and torch.equal(buf, want), f"rank {rank}: buffer {name}"
        assert got["tied"] == got["plain_tied"], "tied embeddings must stay tied (and untied ones untied)"
        assert bool(got["tied"]) == (which != "llama-tiedFalse")
        assert got["held"] <= 0.6 * got["total"], (got["held"], got["total"])
        # deepspeed.initialize took the partitions as they are: no parameter converted again
        # (the plain path broadcasts each one), none left gathered, and at most one gathered
        # at a time (stage 3 gathers each trainable weight once to hook its gradient)
        assert got["broadcast_bytes"] == 0 and got["same_ids"], "deepspeed.initialize re-partitioned the model"
        assert got["left_gathered"] == [], got["left_gathered"]
        assert 0 < got["largest_gather"] <= got["largest_param"], (got["largest_gather"], got["largest_param"])
        sharded, plain = got["logits"]
        torch.testing.assert_close(sharded, plain, rtol=1e-5, atol=1e-5 if dtype == "auto" else 2e-2)
    # gathered on the main rank, the partitions are the plain load's weights exactly
    for name, (_, want) in ranks[0]["params"].items():
        whole = torch.cat([r["params"][name][1] for r in ranks])
        assert torch.equal(ranks[0]["gathered"][name].flatten(), whole), name


def test_the_traffic_record_sees_deepspeed_partition_a_whole_model(zero3_loaded):
    """Control for ``broadcast_bytes == 0``: built whole, every parameter is broadcast from the
    main rank as ``deepspeed.initialize`` partitions it."""
    for got in zero3_loaded["plain"]:
        assert got["broadcast_bytes"] >= got["model_bytes"] > 0, (got["broadcast_bytes"], got["model_bytes"])


# -- a ZeRO-3 prune job: loading sharded changes nothing it decides ---------------------------
def zero3_job(rank, world_size, config_path, weights):
    """A staged Wanda + probe job under parallel=zero3 with ``weights``: whether the model
    came partitioned from the loader, and (main rank) its masks and recorded fingerprint."""
    import json
    from pathlib import Path

    from gradprobe_dist.checkpoint.store import MANIFEST_NAME, load_masks
    from gradprobe_dist.pipeline.config import load_config
    from gradprobe_dist.pipeline.job import PruneJob
    from gradprobe_dist.runtime.env import init_distributed

    out = f"{config_path}.{Path(weights).suffix[1:]}"
    cfg = load_config(config_path, [f"model.path={weights}", f"output_dir={out}"])
    env = init_distributed(device="cpu")
    with PruneJob(cfg, env, show_progress=False) as job:
        partitioned = all(hasattr(p, "ds_id") for p in job.model.parameters())
        job.run(restart=True)
    if not env.is_main:
        return partitioned, None, None
    manifest = json.loads((Path(out) / MANIFEST_NAME).read_text())
    return partitioned, load_masks(out), manifest["model_fingerprint"]


def zero3_jobs(rank, world_size, config_path, weight_files):
    return [zero3_job(rank, world_size, config_path, weights) for weights in weight_files]


def test_a_zero3_job_loaded_sharded_decides_what_it_decides_loaded_whole(tmp_path):
    """The same TinyGPT weights as safetensors (loaded sharded) and as a torch state dict
    (loaded whole on every rank, then partitioned by deepspeed.initialize: the path every
    zero3 job took before sharded loading): bit-identical masks, the same fingerprint (the
    sha256 of every prunable weight, hashed from the gathered partitions)."""
    from gradprobe_dist.models import TinyGPT, TinyGPTConfig
    from gradprobe_dist.pipeline.build import save_weights
    from test_pipeline import TINY_GPT, make_tiny_data, write_config

    torch.manual_seed(3)
    model = TinyGPT(TinyGPTConfig(**TINY_GPT))
    save_weights(model, tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    config = write_config(tmp_path / "run.yaml", make_tiny_data(tmp_path), output_dir=tmp_path / "unused",
                          model={"random_init": False}, parallel="zero3",
                          prune={"strategy": "wanda", "gradient_threshold": 0.05})
    by_rank = run_ranks(zero3_jobs, WORLD, str(config), [str(tmp_path / "model.safetensors"),
                                                          str(tmp_path / "model.pt")],
                        timeout=600, env=ZERO3_ENV)
    (sharded_ok, sharded, sharded_print), (whole_ok, whole, whole_print) = by_rank[0]
    assert [run[0] for run in by_rank[1]] == [True, False]
    assert sharded_ok and not whole_ok  # the loader partitioned the safetensors model only
    assert sharded.keys() == whole.keys() and len(sharded) == 12
    assert any(m.any() for m in sharded.values()) and not all(m.all() for m in sharded.values())
    for name in whole:
        assert torch.equal(sharded[name], whole[name]), name
    assert sharded_print == whole_print and all("sha256" in sharded_print[n] for n in sharded)
