"""`gradprobe export` of a Hugging Face model: a directory plain transformers loads and serves
(config, weights in the model's dtype, tokenizer, generation config, other files of the
source) with the masks as a sidecar; a non-empty target only with --overwrite; never onto
the model it reads, however the path is spelled. The masks come from a real 2-rank FSDP2
run in bfloat16 (each rank loading only its rows)."""
from __future__ import annotations

import pytest
import torch
import yaml

from cli_helpers import run_two_ranks, succeeded
from gradprobe_dist.cli import main

transformers = pytest.importorskip("transformers")
SEQ_LEN = 32


def tiny_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="<s>")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny LLaMA with tokenizer, generation config and chat template, pruned on 2 ranks."""
    from gradprobe_dist.data.shards import bundled_text_path, write_text_shards

    root = tmp_path_factory.mktemp("export")
    source = root / "model"
    tokenizer = tiny_tokenizer(bundled_text_path().read_text()[:20000])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=1))
    model.generation_config = transformers.GenerationConfig(max_new_tokens=7, bos_token_id=1, eos_token_id=1)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    (source / "chat_template.jinja").write_text("{{ messages }}")
    write_text_shards([bundled_text_path()], root / "calib", seq_len=SEQ_LEN, samples_per_shard=4,
                      tokenizer=str(source), max_samples=8)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"kind": "hf", "path": str(source), "dtype": "bfloat16"},
        "data": {"shards": str(root / "calib"), "micro_batch_size": 2},
        "prune": {"strategy": "wanda", "sparsity": 0.5, "num_batches": 2, "gradient_threshold": 1.0e9},
        "parallel": "fsdp", "output_dir": str(root / "masks"), "device": "cpu"}))
    succeeded(run_two_ranks("prune", "--config", config, "--quiet"))
    return {"root": root, "source": source, "config": config, "masks": root / "masks"}


def export(pruned, out, *extra) -> int:
    return main(["export", "--config", str(pruned["config"]), "--masks", str(pruned["masks"]),
                 "--out", str(out), "--quiet", *extra])


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_export_reloads_with_plain_transformers_including_the_tokenizer(pruned):
    from safetensors.torch import load_file

    from gradprobe_dist.checkpoint.store import load_masks

    out = pruned["root"] / "served"
    assert export(pruned, out) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(pruned["source"])
    assert model.dtype == torch.bfloat16  # the model's dtype, as configured
    assert tokenizer("To be, or not to be").input_ids == original("To be, or not to be").input_ids
    assert model.generation_config.max_new_tokens == 7
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    masks = load_masks(pruned["masks"])
    assert sum(int(m.sum()) for m in masks.values()) > 0
    sidecar = load_file(out / "pruning_masks.safetensors")
    assert sorted(sidecar) == sorted(masks) and all(torch.equal(sidecar[n], masks[n]) for n in masks)
    source = dict(transformers.AutoModelForCausalLM.from_pretrained(pruned["source"], dtype=torch.bfloat16)
                  .named_parameters())
    for name, param in model.named_parameters():
        want = source[name].detach()
        want = want.masked_fill(masks[name], 0) if name in masks else want
        assert torch.equal(param.detach(), want), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("To be", return_tensors="pt").input_ids
    assert model.generate(ids, do_sample=False).shape[1] == ids.shape[1] + 7  # it serves


def test_a_non_empty_export_directory_is_refused_unless_overwrite(pruned, log_lines):
    out = pruned["root"] / "taken"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")  # a stale file of an older model
    before = snapshot(out)
    assert export(pruned, out) == 2
    assert snapshot(out) == before
    assert any("already exists and is not empty" in line and "--overwrite" in line for line in log_lines)
    assert export(pruned, out, "--overwrite") == 0
    assert not (out / "model.safetensors.index.json").exists()  # replaced, nothing stale left
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_export_onto_the_source_model_is_refused_however_spelled(pruned, log_lines, monkeypatch):
    source = pruned["source"]
    before = snapshot(source)
    link = pruned["root"] / "link-to-model"
    link.symlink_to(source)
    monkeypatch.chdir(pruned["root"])
    for out in (source, link, "model", "./model/../model", pruned["root"], pruned["masks"]):
        assert export(pruned, out, "--overwrite") == 2, out
    assert snapshot(source) == before
    refusals = [line for line in log_lines if "which the export reads" in line]
    assert len(refusals) == 6 and any("model.path" in r for r in refusals) and "--masks" in refusals[-1]


def test_a_weights_file_export_refuses_an_existing_file(tmp_path, log_lines):
    from gradprobe_dist.models import TinyGPT, TinyGPTConfig
    from gradprobe_dist.pipeline.build import save_weights

    options = {"vocab_size": 32, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8}
    save_weights(TinyGPT(TinyGPTConfig.from_dict(options)), tmp_path / "w.safetensors")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"kind": "tinygpt", "path": str(tmp_path / "w.safetensors"),
                                                "options": options}, "output_dir": str(tmp_path / "m")}))
    (tmp_path / "m").mkdir()  # the target is checked before the masks are read
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    assert main(["export", "--config", str(config), "--masks", str(tmp_path / "m"), "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep"
    assert main(["export", "--config", str(config), "--masks", str(tmp_path / "m"),
                 "--out", str(tmp_path / "w.safetensors"), "--overwrite"]) == 2
    assert any("already exists" in line for line in log_lines)
    assert any("model.path" in line and "which the export reads" in line for line in log_lines)
