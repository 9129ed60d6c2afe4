"""The shipped SmolLM2 configs validate with a user's own paths (a tiny LLaMA stands in for
SmolLM2, the bundled excerpts for the user's text) and say what the README recommends."""
from pathlib import Path

import pytest
import torch

from gradprobe_dist import cli
from gradprobe_dist.data.shards import bundled_text_path, write_text_shards
from gradprobe_dist.pipeline.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def user_inputs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "model")
    write_text_shards([bundled_text_path("train")], root / "calib", seq_len=16, samples_per_shard=8, max_samples=32)
    write_text_shards([bundled_text_path("valid")], root / "valid", seq_len=16, samples_per_shard=8, max_samples=16)
    return root


@pytest.mark.parametrize("name, pattern", [("smollm2-50.yaml", None), ("smollm2-2of4.yaml", "2:4")])
def test_shipped_config_validates_with_a_users_paths(user_inputs, tmp_path, capsys, name, pattern):
    overrides = [f"model.path={user_inputs / 'model'}", f"data.shards={user_inputs / 'calib'}",
                 f"data.eval_shards={user_inputs / 'valid'}", f"output_dir={tmp_path / 'masks'}"]
    assert cli.main(["validate", "--config", str(CONFIGS / name), *overrides]) == 0
    assert "# config OK" in capsys.readouterr().out
    assert not (tmp_path / "masks").exists()
    cfg = load_config(CONFIGS / name, overrides).prune
    assert (cfg.mode, cfg.veto, cfg.veto_fraction, cfg.guard, cfg.guard_batches, cfg.sparsity) == (
        "sparsegpt", "fraction", 0.1, True, 2, 0.5)
    assert cfg.strategy_options.get("pattern") == pattern
    assert load_config(CONFIGS / name, overrides).parallel == "fsdp"
