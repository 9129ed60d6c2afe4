"""Every subcommand's failure paths: exit status 2, exactly one ``ERROR`` line that names the
problem (and the fix), no traceback, nothing the user had written lost.

One process (``cli.main`` in this process) on tiny data; one real 2-rank torchrun job for
the launcher's side (rank 0's ERROR line first, the summary without our traceback).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradprobe_dist import cli

sys.path.insert(0, os.path.dirname(__file__))
from cli_helpers import run_two_ranks  # noqa: E402
from test_pipeline import TINY_GPT, make_tiny_data, write_config  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny shards, a config, weights and a finished mask checkpoint, shared read-only."""
    root = tmp_path_factory.mktemp("errors")
    data = make_tiny_data(root / "data")
    config = write_config(root / "run.yaml", data, output_dir=root / "masks")
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    assert cli.main(["train", "--config", str(config), "--steps", "1", "--out", str(root / "model.safetensors"),
                     "--quiet"]) == 0
    torch.save(torch.randn(8, 3), root / "x.pt")
    return root


def corrupt_first_sample(shards: Path, *, keep_digest: bool) -> Path:
    """Overwrite the first token id of shard 0 with 300, in place and at the same size: the
    tar's header checksum and ``torch.load`` (no CRC check) both accept the damage."""
    shard = shards / "calib-000000.tar"
    data = bytearray(shard.read_bytes())
    first_ids = torch.tensor(list(b"THE COMEDY"), dtype=torch.int64).numpy().tobytes()
    at = data.index(first_ids)
    data[at:at + 8] = torch.tensor([300], dtype=torch.int64).numpy().tobytes()
    shard.write_bytes(bytes(data))
    if not keep_digest:  # as shards written before digests were recorded
        meta = json.loads((shards / "metadata.json").read_text())
        for entry in meta["shards"]:
            del entry["sha256"]
        (shards / "metadata.json").write_text(json.dumps(meta))
    return shard


def copy_shards(root: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(root / "data" / "calib", tmp / "calib"))


# Each case: (subcommand arguments, with {root}/{tmp} placeholders; a set-up run first, given
# (root, tmp) and returning extra overrides; the regex the ERROR line must match)
CONFIG = "--config {root}/run.yaml"
CASES = {
    # -- the config and the command line
    "config missing": ("validate --config {tmp}/nope.yaml", None, r"config file .*nope.yaml does not exist"),
    "config a directory": ("prune --config {tmp}", None, r"config file .* cannot be read .*--config"),
    "config not yaml": ("prune --config {tmp}/bad.yaml", lambda r, t: (t / "bad.yaml").write_text("a: [1"),
                        r"is not valid YAML"),
    "config not a mapping": ("prune --config {tmp}/list.yaml",
                             lambda r, t: (t / "list.yaml").write_text(yaml.safe_dump([1, 2])),
                             r"must hold a mapping of keys, got list"),
    "override not yaml": (f"validate {CONFIG} prune.stages=[[a", None, r"override 'prune.stages=\[\[a'.*not valid YAML"),
    "override unknown key": (f"validate {CONFIG} prune.sparsty=0.5", None, r"unknown key 'prune.sparsty'"),
    "override bad value": (f"prune {CONFIG} prune.sparsity=1.5", None, r"prune.sparsity=1.5 is outside \[0, 1\)"),
    "unknown option": (f"prune {CONFIG} --restat", None, r"unrecognized arguments: --restat; see"),
    "missing argument": ("export --config x.yaml --out y", None, r"required: --masks; see `gradprobe export --help`"),
    # -- the model
    "weights missing": (f"prune {CONFIG} model.path={{tmp}}/none.safetensors", None,
                        r"weights file .*none.safetensors does not exist"),
    "random model refused": (f"prune {CONFIG} model.random_init=false", None,
                             r"model.path is not set.*randomly initialised.*model.random_init=true"),
    "random model refused by eval": (f"eval {CONFIG} model.random_init=false", None, r"model.path is not set"),
    "random model refused by export": (f"export {CONFIG} --masks {{root}}/masks --out {{tmp}}/o.safetensors "
                                       "model.random_init=false", None, r"model.path is not set"),
    "weights of another model": (f"prune {CONFIG} model.path={{root}}/model.safetensors "
                                 "model.options.n_embd=32", None,
                                 r"does not fit the configured model.*model.options"),
    "weights not a weights file": (f"prune {CONFIG} model.path={{tmp}}/w.pt",
                                   lambda r, t: (t / "w.pt").write_bytes(b"not a pickle"),
                                   r"weights file .*w.pt cannot be read .*model.path"),
    # -- the calibration data
    "shards missing": (f"prune {CONFIG} data.shards={{tmp}}/none", None, r"no shards found: .*none/metadata.json"),
    "vocabulary too small": (f"prune {CONFIG} model.options.vocab_size=100", None,
                             r"tokenised with 'bytes' \(vocabulary 256\).*has 100 tokens.*--tokenizer"),
    "tensor shards for an LM": (f"prune {CONFIG} data.shards={{tmp}}/tensors",
                                lambda r, t: cli.main(["make-shards", "--inputs", str(r / "x.pt"), "--targets",
                                                       str(r / "x.pt"), "--out", str(t / "tensors"),
                                                       "--samples-per-shard", "2", "--quiet"]),
                                r"hold tensor samples, but the model takes token ids"),
    "corrupt sample (digest)": (f"prune {CONFIG} data.shards={{tmp}}/calib",
                                lambda r, t: corrupt_first_sample(copy_shards(r, t), keep_digest=True),
                                r"shard .*calib-000000.tar is truncated or corrupt: its sha256 differs"),
    "corrupt sample (no digest)": (f"prune {CONFIG} data.shards={{tmp}}/calib",
                                   lambda r, t: corrupt_first_sample(copy_shards(r, t), keep_digest=False),
                                   r"sample 000000000 of shard .*calib-000000.tar holds token id 300, outside "
                                   r"the model's vocabulary 0..255"),
    "shard manifest not json": (f"prune {CONFIG} data.shards={{tmp}}/calib",
                                lambda r, t: (copy_shards(r, t) / "metadata.json").write_text("{"),
                                r"metadata.json is not a shard manifest"),
    "output_dir a file": (f"prune {CONFIG} output_dir={{tmp}}/f", lambda r, t: (t / "f").write_text("x"),
                          r"output_dir .*/f is a file: name a directory"),
    # -- validate reads what prune would read
    "validate: shards missing": (f"validate {CONFIG} data.shards={{tmp}}/none", None, r"no shards found"),
    "validate: eval shards missing": (f"validate {CONFIG} data.eval_shards={{tmp}}/none", None, r"no shards found"),
    "validate: weights missing": (f"validate {CONFIG} model.path={{tmp}}/none.safetensors", None,
                                  r"weights file .*none.safetensors does not exist"),
    "validate: vocabulary": (f"validate {CONFIG} model.options.vocab_size=100", None, r"vocabulary 256"),
    "validate: corrupt sample": (f"validate {CONFIG} data.shards={{tmp}}/calib",
                                 lambda r, t: corrupt_first_sample(copy_shards(r, t), keep_digest=False),
                                 r"holds token id 300"),
    "validate: hf without config.json": (f"validate {CONFIG} model.kind=hf model.path={{tmp}}", None,
                                         r"holds no config.json"),
    # -- sweep, eval, export, inspect, plot
    "sweep without eval shards": (f"sweep {CONFIG} data.eval_shards=null", None, r"data.eval_shards is not set"),
    "sweep --out a directory": (f"sweep {CONFIG} --out {{tmp}}", None, r"--out .* is a directory"),
    "sweep --out exists": (f"sweep {CONFIG} --out {{tmp}}/s.json", lambda r, t: (t / "s.json").write_text("{}"),
                           r"--out .*s.json already exists.*--overwrite"),
    "eval masks missing": (f"eval {CONFIG} --masks {{tmp}}/none", None, r"none.*not a mask checkpoint"),
    "eval without eval shards": (f"eval {CONFIG} data.eval_shards=null", None, r"no evaluation data"),
    "export masks missing": (f"export {CONFIG} --masks {{tmp}}/none --out {{tmp}}/o.safetensors", None,
                             r"not a mask checkpoint"),
    "inspect missing": ("inspect {tmp}/none", None, r"not a mask checkpoint"),
    "inspect a file": ("inspect {root}/run.yaml", None, r"not a mask checkpoint"),
    "plot missing": ("plot {tmp}/none --out {tmp}/png", None, r"not a mask checkpoint"),
    "plot --out a file": ("plot {root}/masks --out {root}/run.yaml", None, r"--out .*run.yaml is a file"),
    "fetch-model unknown": ("fetch-model gpt-9 --out {tmp}/m", None, r"unknown model 'gpt-9': choose one of"),
    # -- make-shards and train
    "make-shards text missing": ("make-shards --text {tmp}/none.txt --out {tmp}/s", None, r"text files not found"),
    "make-shards over shards": ("make-shards --bundled valid --out {root}/data/valid", None,
                                r"already holds shards .*--overwrite"),
    "make-shards out a file": ("make-shards --bundled valid --out {root}/run.yaml", None, r"run.yaml is a file"),
    "make-shards inputs missing": ("make-shards --inputs {tmp}/none.pt --targets {tmp}/none.pt --out {tmp}/s", None,
                                   r"tensor file .*none.pt does not exist"),
    "make-shards inputs corrupt": ("make-shards --inputs {tmp}/bad.pt --targets {root}/x.pt --out {tmp}/s",
                                   lambda r, t: (t / "bad.pt").write_bytes(b"garbage"),
                                   r"bad.pt is not a readable .pt tensor file"),
    "make-shards targets alone": ("make-shards --bundled valid --targets {root}/x.pt --out {tmp}/s", None,
                                  r"--targets goes with --inputs"),
    "make-shards bad tokenizer": ("make-shards --bundled valid --tokenizer {tmp} --out {tmp}/s", None,
                                  r"tokenizer .* cannot be loaded"),
    "make-shards seq-len 0": ("make-shards --bundled valid --seq-len 0 --out {tmp}/s", None, r"seq_len must be at least 1"),
    "train over weights": (f"train {CONFIG} --steps 1 --out {{root}}/model.safetensors", None,
                           r"model.safetensors already exists.*--overwrite"),
    "train steps 0": (f"train {CONFIG} --steps 0 --out {{tmp}}/m.safetensors", None, r"--steps=0 must be >= 1"),
    "train shards missing": (f"train {CONFIG} data.shards={{tmp}}/none --steps 1 --out {{tmp}}/m.safetensors", None,
                             r"no shards found"),
    "train vocabulary": (f"train {CONFIG} model.options.vocab_size=100 --steps 1 --out {{tmp}}/m.safetensors", None,
                         r"vocabulary 256"),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_failure_is_one_error_line_with_exit_2(case, root, tmp_path, capfd, log_lines):
    argv, setup, message = CASES[case]
    extra = setup(root, tmp_path) if setup else None
    before = snapshot(root)
    capfd.readouterr()
    log_lines.clear()
    argv = argv.format(root=root, tmp=tmp_path).split() + (extra if isinstance(extra, list) else [])
    code = cli.main(argv)
    err = capfd.readouterr().err
    errors = [line for line in log_lines if line.startswith("ERROR")]
    assert code == 2 and len(errors) == 1, (code, log_lines, err[-2000:])
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in err, err[-2000:]
    assert snapshot(root) == before  # nothing already written was changed or lost


def test_a_failed_prune_leaves_no_checkpoint_and_the_corrected_rerun_runs(root, tmp_path):
    config = write_config(tmp_path / "run.yaml", make_tiny_data(root / "data"), output_dir=tmp_path / "masks",
                          prune={"stage_size": 0})
    assert cli.main(["prune", "--config", str(config), f"data.shards={tmp_path}/typo", "--quiet"]) == 2
    assert not (tmp_path / "masks").exists()  # no checkpoint pins the wrong path
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    assert (tmp_path / "masks" / "manifest.json").is_file()


def test_validate_reads_the_inputs_it_names(root, capsys):
    assert cli.main(["validate", "--config", str(root / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "# data.shards" in out and "read and checked" in out and "# data.eval_shards" in out
    assert "# config OK" in out


def test_overwrite_options_replace_outputs(root, tmp_path, capsys):
    shards = copy_shards(root, tmp_path)
    assert cli.main(["make-shards", "--bundled", "valid", "--out", str(shards), "--seq-len", "16",
                     "--samples-per-shard", "8", "--max-samples", "16", "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in shards.glob("*.tar")) == ["calib-000000.tar", "calib-000001.tar"]  # none stale
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"old")
    assert cli.main(["train", "--config", str(root / "run.yaml"), "--steps", "1", "--out", str(weights),
                     "--overwrite", "--quiet"]) == 0
    assert weights.read_bytes() != b"old"


def test_two_ranks_exit_non_zero_with_rank_0s_error_first(root, tmp_path):
    config = write_config(tmp_path / "run.yaml", make_tiny_data(root / "data"), output_dir=tmp_path / "masks",
                          parallel="ddp", model={"options": {**TINY_GPT, "vocab_size": 100}})
    result = run_two_ranks("prune", "--config", config)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert ours and ours[0].startswith("[rank 0] ERROR ") and "vocabulary 256" in ours[0], result.stderr[-3000:]
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "rank      : 0" in summary and "vocabulary 256" in summary  # rank 0 is the root cause
    assert 'File "' not in result.stderr.split("ChildFailedError")[-1]  # no traceback of ours in the summary
    assert not (tmp_path / "masks").exists()
