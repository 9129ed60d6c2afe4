"""The per-layer mask checkpoint: bit-exact round trips, resume, mismatch, corruption, crashes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gradprobe_dist.checkpoint import format as ckpt
from gradprobe_dist.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    MaskCheckpoint,
    apply_masks,
    load_masks,
    model_fingerprint,
    read_manifest,
)

SHAPES = {"a.weight": [3, 5], "b.bias": [7], "c.weight": [2, 3, 4, 5], "d.scale": [], "e/odd:name": [9]}
FINGERPRINT = {name: {"shape": shape, "dtype": "float32"} for name, shape in SHAPES.items()}
CONFIG = {"strategy": "magnitude", "sparsity": 0.5, "reduction_factor": 0.1, "seed": 0,
          "stages": (2, 4)}
REPO_ROOT = Path(__file__).resolve().parents[1]


def random_mask(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < 0.4


def stats(tentative=10, restored=3, **extra):
    return {"tentative": tentative, "restored": restored, "seconds": 0.25, **extra}


def open_checkpoint(directory, *, fingerprint=FINGERPRINT, config=CONFIG, restart=False):
    return MaskCheckpoint.open(directory, model_fingerprint=fingerprint, config=config, restart=restart)


def save_two_layers(directory):
    checkpoint = open_checkpoint(directory)
    masks = {name: random_mask(SHAPES[name], seed) for seed, name in enumerate(["a.weight", "b.bias"])}
    for name, mask in masks.items():
        checkpoint.save_layer(name, mask, stats=stats())
    return checkpoint, masks


def test_round_trip_of_odd_shapes_is_bit_exact(tmp_path):
    checkpoint = open_checkpoint(tmp_path)
    masks = {name: random_mask(shape, seed) for seed, (name, shape) in enumerate(SHAPES.items())}
    masks["c.weight"][0, 0, 0, :] = True  # a full byte of ones and a bit in the last byte
    masks["c.weight"][-1, -1, -1, -1] = True
    for name, mask in masks.items():
        checkpoint.save_layer(name, mask, stats=stats())

    for name, mask in masks.items():
        loaded = checkpoint.load_layer(name)
        assert loaded.dtype == torch.bool and list(loaded.shape) == SHAPES[name]
        assert torch.equal(loaded, mask), name
    reread = load_masks(tmp_path)
    assert list(reread) == list(masks)
    assert all(torch.equal(reread[name], masks[name]) for name in masks)


def test_layer_files_are_bit_packed(tmp_path):
    fingerprint = {"big.weight": {"shape": [1000, 1000], "dtype": "float32"}}
    checkpoint = open_checkpoint(tmp_path, fingerprint=fingerprint)
    mask = random_mask([1000, 1000], 0)
    checkpoint.save_layer("big.weight", mask, stats=stats())
    size = (tmp_path / checkpoint.layer_info("big.weight")["file"]).stat().st_size
    assert 125_000 <= size < 126_000
    assert torch.equal(checkpoint.load_layer("big.weight"), mask)


def test_manifest_records_layer_stats_and_order(tmp_path):
    checkpoint = open_checkpoint(tmp_path)
    mask = random_mask([3, 5], 1)
    checkpoint.save_layer("a.weight", mask, stats=stats(tentative=9, restored=2, stage=1))
    checkpoint.save_layer("b.bias", torch.zeros(7, dtype=torch.bool), stats=stats())

    manifest = read_manifest(tmp_path)
    assert manifest["format_version"] == 1
    assert manifest["order"] == ["a.weight", "b.bias"]
    assert manifest["model_fingerprint"] == FINGERPRINT
    assert manifest["config"]["sparsity"] == 0.5
    assert manifest["config_hash"] == ckpt.config_hash(manifest["config"])
    info = checkpoint.layer_info("a.weight")
    assert info["pruned"] == int(mask.sum()) and info["numel"] == 15
    assert info["sparsity"] == pytest.approx(int(mask.sum()) / 15)
    assert (info["tentative"], info["restored"], info["seconds"], info["stage"]) == (9, 2, 0.25, 1)
    assert info == manifest["layers"]["a.weight"]
    rows = checkpoint.summary_rows()
    assert [row["name"] for row in rows] == ["a.weight", "b.bias"]
    assert rows[1] == {"name": "b.bias", "shape": [7], "tentative": 10, "pruned": 0,
                       "restored": 3, "sparsity": 0.0}


def test_extra_tensors_round_trip(tmp_path):
    checkpoint = open_checkpoint(tmp_path)
    ratio = torch.randn(3, 5)
    mask = ratio > 0
    checkpoint.save_layer("a.weight", mask, stats=stats(), tensors={"ratio": ratio})
    reopened = open_checkpoint(tmp_path)
    extra = reopened.load_layer_tensors("a.weight")
    assert list(extra) == ["ratio"] and torch.equal(extra["ratio"], ratio)
    assert torch.equal(reopened.load_layer("a.weight"), mask)
    assert reopened.layer_info("a.weight")["tensors"] == ["ratio"]


def test_resume_lists_completed_layers_and_keeps_saving(tmp_path):
    _, masks = save_two_layers(tmp_path)
    resumed = open_checkpoint(tmp_path)  # tuples in config read back as lists: still equal
    assert resumed.completed() == ["a.weight", "b.bias"]
    assert torch.equal(resumed.load_layer("b.bias"), masks["b.bias"])
    resumed.save_layer("c.weight", random_mask([2, 3, 4, 5], 5), stats=stats())
    assert open_checkpoint(tmp_path).completed() == ["a.weight", "b.bias", "c.weight"]


def test_config_mismatch_names_the_field(tmp_path):
    save_two_layers(tmp_path)
    with pytest.raises(CheckpointMismatchError) as err:
        open_checkpoint(tmp_path, config={**CONFIG, "sparsity": 0.6, "statistic": "mean"})
    message = str(err.value)
    assert "config field 'sparsity' is 0.5 in the checkpoint but 0.6 now" in message
    assert "config field 'statistic' is missing in the checkpoint" in message
    assert "--restart" in message and "seed" not in message
    assert isinstance(err.value, ValueError)
    assert read_manifest(tmp_path)["order"] == ["a.weight", "b.bias"]  # nothing was touched


def test_fingerprint_mismatch_names_the_parameter(tmp_path):
    save_two_layers(tmp_path)
    changed = {**FINGERPRINT, "a.weight": {"shape": [3, 6], "dtype": "float32"}}
    del changed["b.bias"]
    with pytest.raises(CheckpointMismatchError) as err:
        open_checkpoint(tmp_path, fingerprint=changed)
    message = str(err.value)
    assert "parameter 'a.weight' has shape [3, 5] in the checkpoint but [3, 6] now" in message
    assert "parameter 'b.bias' is in the checkpoint but not in the model now" in message
    assert "--restart" in message


def test_model_fingerprint_describes_every_parameter_and_detects_changes(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).to(torch.float64))
    assert model_fingerprint(model) == {
        "0.weight": {"shape": [3, 4], "dtype": "float32"},
        "0.bias": {"shape": [3], "dtype": "float32"},
        "1.weight": {"shape": [2, 3], "dtype": "float64"},
        "1.bias": {"shape": [2], "dtype": "float64"},
    }
    open_checkpoint(tmp_path, fingerprint=model_fingerprint(model))
    open_checkpoint(tmp_path, fingerprint=model_fingerprint(model))  # same model resumes
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(CheckpointMismatchError, match=r"'1.weight' has dtype \"float64\""):
        open_checkpoint(tmp_path, fingerprint=model_fingerprint(other))


def test_restart_discards_the_old_checkpoint(tmp_path):
    first, _ = save_two_layers(tmp_path)
    old_files = [tmp_path / first.layer_info(name)["file"] for name in ("a.weight", "b.bias")]
    (tmp_path / "unrelated.txt").write_text("kept")
    fresh = open_checkpoint(tmp_path, config={**CONFIG, "sparsity": 0.9}, restart=True)
    assert fresh.completed() == []
    assert not any(path.exists() for path in old_files)
    assert read_manifest(tmp_path)["config"]["sparsity"] == 0.9
    assert (tmp_path / "unrelated.txt").read_text() == "kept"


def test_truncated_layer_file_is_reported_by_name(tmp_path):
    checkpoint, _ = save_two_layers(tmp_path)
    path = tmp_path / checkpoint.layer_info("b.bias")["file"]
    path.write_bytes(path.read_bytes()[:-3])
    resumed = open_checkpoint(tmp_path)
    for call in (resumed.completed, lambda: resumed.load_layer("b.bias")):
        with pytest.raises(CorruptCheckpointError) as err:
            call()
        assert str(path) in str(err.value) and "--restart" in str(err.value)
    assert path.exists() and "b.bias" in read_manifest(tmp_path)["layers"]  # nothing deleted
    assert resumed.load_layer("a.weight").shape == (3, 5)  # the intact layer still loads


def test_missing_layer_file_is_reported_by_name(tmp_path):
    checkpoint, _ = save_two_layers(tmp_path)
    path = tmp_path / checkpoint.layer_info("a.weight")["file"]
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing") as err:
        open_checkpoint(tmp_path).completed()
    assert str(path) in str(err.value)
    with pytest.raises(CorruptCheckpointError, match="a.weight"):
        load_masks(tmp_path)


def test_unparsable_manifest_is_a_clear_error(tmp_path):
    save_two_layers(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CorruptCheckpointError, match="manifest.json' is not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="--restart"):
        open_checkpoint(tmp_path)
    assert open_checkpoint(tmp_path, restart=True).completed() == []
    with pytest.raises(FileNotFoundError, match="not a mask checkpoint"):
        read_manifest(tmp_path / "nowhere")


def test_manifest_missing_fields_is_corrupt(tmp_path):
    save_two_layers(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["order"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="'order'"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("failing_replace", [1, 2], ids=["layer-file", "manifest"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, failing_replace):
    checkpoint, masks = save_two_layers(tmp_path)
    manifest_before = (tmp_path / "manifest.json").read_bytes()
    calls = []
    real_replace = os.replace

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_replace:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save_layer("c.weight", random_mask([2, 3, 4, 5], 7), stats=stats())
    monkeypatch.setattr(os, "replace", real_replace)

    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    assert checkpoint.completed() == ["a.weight", "b.bias"]
    assert list(tmp_path.rglob("*.tmp")) == []
    resumed = open_checkpoint(tmp_path)
    assert resumed.completed() == ["a.weight", "b.bias"]
    assert all(torch.equal(resumed.load_layer(name), mask) for name, mask in masks.items())
    mask = random_mask([2, 3, 4, 5], 8)
    resumed.save_layer("c.weight", mask, stats=stats())  # the retry overwrites any orphan file
    assert torch.equal(load_masks(tmp_path)["c.weight"], mask)


def test_killed_writer_leaves_loadable_checkpoint(tmp_path):
    """A process killed between writing the temp file and renaming it (no cleanup runs)."""
    _, masks = save_two_layers(tmp_path)
    script = textwrap.dedent(f"""
        import os, torch
        from gradprobe_dist.checkpoint.store import MaskCheckpoint
        fingerprint = {json.dumps(FINGERPRINT)}
        config = {json.dumps(CONFIG)}
        checkpoint = MaskCheckpoint.open({str(tmp_path)!r}, model_fingerprint=fingerprint, config=config)
        os.replace = lambda src, dst: os._exit(9)
        checkpoint.save_layer("c.weight", torch.ones(2, 3, 4, 5, dtype=torch.bool),
                              stats={{"tentative": 1, "restored": 0, "seconds": 0.0}})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()
    assert list((tmp_path / "layers").glob(".*.tmp"))  # the killed writer left its temp file

    resumed = open_checkpoint(tmp_path)
    assert list(tmp_path.rglob("*.tmp")) == []  # open cleans leftovers
    assert resumed.completed() == ["a.weight", "b.bias"]
    assert all(torch.equal(resumed.load_layer(name), mask) for name, mask in masks.items())


def test_apply_masks_zeros_exactly_the_masked_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    checkpoint = open_checkpoint(tmp_path, fingerprint=model_fingerprint(model))
    masks = {"0.weight": random_mask([3, 5], 1), "2.weight": random_mask([2, 3], 2)}
    for name, mask in masks.items():
        checkpoint.save_layer(name, mask, stats=stats())

    applied = apply_masks(model, tmp_path)
    assert set(applied) == set(masks)
    for name, param in model.named_parameters():
        mask = masks.get(name, torch.zeros_like(param, dtype=torch.bool))
        assert torch.all(param[mask] == 0), name
        assert torch.equal(param[~mask], original[name][~mask]), name
    assert all(torch.all(original[name][mask] != 0) for name, mask in masks.items())


def test_apply_masks_rejects_unknown_names_and_wrong_shapes_before_editing():
    model = nn.Sequential(nn.Linear(5, 3))
    before = model[0].weight.detach().clone()
    good = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="'missing.weight'"):
        apply_masks(model, {"0.weight": good, "missing.weight": good})
    with pytest.raises(ValueError, match=r"'0.bias' \(mask torch.bool \[5\], parameter \[3\]\)"):
        apply_masks(model, {"0.weight": good, "0.bias": torch.ones(5, dtype=torch.bool)})
    assert torch.equal(model[0].weight, before)


def test_save_layer_rejects_bad_input(tmp_path):
    checkpoint = open_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="BoolTensor"):
        checkpoint.save_layer("a.weight", torch.ones(3, 5), stats=stats())
    with pytest.raises(ValueError, match=r"shape \[3, 4\].*\[3, 5\]"):
        checkpoint.save_layer("a.weight", torch.ones(3, 4, dtype=torch.bool), stats=stats())
    with pytest.raises(ValueError, match="'nope.weight' is not a parameter"):
        checkpoint.save_layer("nope.weight", torch.ones(3, dtype=torch.bool), stats=stats())
    with pytest.raises(ValueError, match=r"lack \['seconds'\]"):
        checkpoint.save_layer("a.weight", torch.ones(3, 5, dtype=torch.bool),
                              stats={"tentative": 1, "restored": 0})
    with pytest.raises(ValueError, match="computes itself"):
        checkpoint.save_layer("a.weight", torch.ones(3, 5, dtype=torch.bool), stats=stats(pruned=15))
    with pytest.raises(TypeError, match="JSON-serialisable"):
        checkpoint.save_layer("a.weight", torch.ones(3, 5, dtype=torch.bool),
                              stats=stats(tentative=torch.tensor(3)))
    assert checkpoint.completed() == [] and list((tmp_path / "layers").iterdir()) == []
    checkpoint.save_layer("a.weight", torch.ones(3, 5, dtype=torch.bool), stats=stats())
    with pytest.raises(ValueError, match="already saved"):
        checkpoint.save_layer("a.weight", torch.ones(3, 5, dtype=torch.bool), stats=stats())


def test_layer_file_names_are_safe_and_distinct(tmp_path):
    fingerprint = {name: {"shape": [2], "dtype": "float32"} for name in ("x/y", "x_y", "../up")}
    checkpoint = open_checkpoint(tmp_path, fingerprint=fingerprint)
    for seed, name in enumerate(fingerprint):
        checkpoint.save_layer(name, torch.tensor([seed % 2 == 0, True]), stats=stats())
    files = [checkpoint.layer_info(name)["file"] for name in fingerprint]
    assert len(set(files)) == 3
    assert all(Path(tmp_path / f).resolve().parent == (tmp_path / "layers").resolve() for f in files)
    assert [m.tolist() for m in load_masks(tmp_path).values()] == [[True, True], [False, True], [True, True]]
