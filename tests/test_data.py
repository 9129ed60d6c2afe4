"""Calibration shards: write, read back per rank, global batches, and every validation error."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from multiproc import run_ranks  # noqa: E402

from gradprobe_dist.data.loader import shard_batches, token_vocab_size  # noqa: E402
from references import global_reference_batches  # noqa: E402
from gradprobe_dist.data.shards import (  # noqa: E402
    bundled_text_path,
    load_tensor,
    write_tensor_shards,
    write_text_shards,
)

SEQ_LEN = 32


def _byte_windows(raw: bytes, count: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)[: count * seq_len].long().view(count, seq_len)


def _ids(batches) -> torch.Tensor:
    """All sample rows of text or tensor batches, stacked in read order."""
    return torch.cat([b["input_ids"] if isinstance(b, dict) else b[0] for b in batches])


def _numbered_tensor_shards(out_dir: Path, num_samples: int, samples_per_shard: int) -> torch.Tensor:
    """Tensor shards whose row i is identifiable: inputs[i] = [i, i, i], targets[i] = -i."""
    inputs = torch.arange(num_samples, dtype=torch.float32)[:, None].expand(num_samples, 3)
    write_tensor_shards(inputs, -torch.arange(num_samples), out_dir, samples_per_shard=samples_per_shard)
    return inputs


# ---------------------------------------------------------------- text shards


def test_text_shards_round_trip_bytes_across_files(tmp_path):
    raw = bundled_text_path().read_bytes()
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(raw[:1000])  # 1000 is not a multiple of SEQ_LEN: a window spans both files
    second.write_bytes(raw[5000:6000])
    paths = write_text_shards([first, second], tmp_path / "shards", seq_len=SEQ_LEN,
                              samples_per_shard=5, max_samples=20)

    assert [p.name for p in paths] == [f"calib-{i:06d}.tar" for i in range(4)]
    meta = json.loads((tmp_path / "shards" / "metadata.json").read_text())
    assert meta["kind"] == "text" and meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256
    assert meta["seq_len"] == SEQ_LEN and meta["num_samples"] == 20
    assert meta["sources"] == [str(first), str(second)]
    assert [s["name"] for s in meta["shards"]] == [p.name for p in paths]
    assert [s["num_samples"] for s in meta["shards"]] == [5, 5, 5, 5]

    batches = shard_batches(tmp_path / "shards", micro_batch_size=4, num_batches=5)
    assert len(batches) == 5
    for batch in batches:
        assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (4, SEQ_LEN)
        assert torch.equal(batch["labels"], batch["input_ids"])
    assert torch.equal(_ids(batches), _byte_windows(raw[:1000] + raw[5000:6000], 20))


def test_text_shards_keep_only_whole_windows_and_uneven_last_shard(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 2 + b"tail")  # 516 bytes -> 16 windows of 32, 4 bytes dropped
    write_text_shards([text], tmp_path / "s", seq_len=SEQ_LEN, samples_per_shard=6)
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["num_samples"] == 16
    assert [s["num_samples"] for s in meta["shards"]] == [6, 6, 4]
    batches = shard_batches(tmp_path / "s", micro_batch_size=8, num_batches=2)
    assert torch.equal(_ids(batches), _byte_windows(text.read_bytes(), 16))


def test_hugging_face_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log " * 8)
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator([text.read_text()], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(tmp_path / "tok")

    write_text_shards([text], tmp_path / "s", seq_len=8, samples_per_shard=4, tokenizer=str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    expected = torch.tensor(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["tokenizer"] == str(tmp_path / "tok") and meta["vocab_size"] == len(tokenizer)
    assert len(expected) == 13 * 8 and meta["num_samples"] == 13
    batches = shard_batches(tmp_path / "s", micro_batch_size=3, num_batches=4)
    assert torch.equal(_ids(batches), expected[:96].view(12, 8))


# ---------------------------------------------------------------- tensor shards


def test_tensor_shards_round_trip_dtypes_and_files(tmp_path):
    inputs = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.arange(10) * 7
    torch.save(inputs, tmp_path / "x.pt")
    np.save(tmp_path / "y.npy", targets.numpy())
    write_tensor_shards(tmp_path / "x.pt", tmp_path / "y.npy", tmp_path / "s", samples_per_shard=3)

    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["kind"] == "tensor" and meta["num_samples"] == 10
    assert [s["num_samples"] for s in meta["shards"]] == [3, 3, 3, 1]
    assert meta["input_shape"] == [3, 4] and meta["input_dtype"] == "torch.bfloat16"
    assert meta["sources"] == [str(tmp_path / "x.pt"), str(tmp_path / "y.npy")]
    batches = shard_batches(tmp_path / "s", micro_batch_size=5, num_batches=2)
    assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    assert torch.equal(torch.cat([b[0] for b in batches]), inputs)  # exact, dtype included
    assert torch.equal(torch.cat([b[1] for b in batches]), targets)


def test_load_tensor_rejects_unknown_suffix_and_non_tensors(tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "d.pt")
    with pytest.raises(TypeError, match="not a tensor"):
        load_tensor(tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"\.pt, \.pth or \.npy"):
        load_tensor(tmp_path / "x.csv")


# ---------------------------------------------------------------- ranks and global batches


def test_each_rank_reads_its_own_shards_disjoint_and_covering(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=24, samples_per_shard=3)  # 8 shards
    for world_size in (2, 4):
        per_rank = [
            _ids(shard_batches(tmp_path, micro_batch_size=3, num_batches=8 // world_size,
                                     rank=r, world_size=world_size))[:, 0].long()
            for r in range(world_size)
        ]
        for rank, ids in enumerate(per_rank):
            shard_of_sample = ids // 3
            assert torch.equal(shard_of_sample % world_size, torch.full_like(ids, rank))  # shard i -> i % W
            assert torch.equal(ids, ids.sort().values)  # shard order, file order
        assert torch.equal(torch.cat(per_rank).sort().values, torch.arange(24))  # disjoint and covering


def test_explicit_rank_wins_over_distributed_environment(tmp_path, monkeypatch):
    _numbered_tensor_shards(tmp_path, num_samples=8, samples_per_shard=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ids = _ids(shard_batches(tmp_path, micro_batch_size=4, num_batches=2))[:, 0]
    assert torch.equal(ids, torch.arange(8.0))


def test_global_reference_is_rank_ordered_concatenation(tmp_path):
    write_text_shards([bundled_text_path()], tmp_path, seq_len=SEQ_LEN, samples_per_shard=4, max_samples=24)
    reference = global_reference_batches(tmp_path, micro_batch_size=2, num_batches=3, world_size=2)
    rank0, rank1 = (shard_batches(tmp_path, micro_batch_size=2, num_batches=3, rank=r, world_size=2)
                    for r in (0, 1))
    windows = _byte_windows(bundled_text_path().read_bytes(), 24).view(6, 4, SEQ_LEN)  # by shard
    assert len(reference) == 3
    for step, batch in enumerate(reference):
        expected = torch.cat([rank0[step]["input_ids"], rank1[step]["input_ids"]])
        assert torch.equal(batch["input_ids"], expected) and torch.equal(batch["labels"], expected)
    # rank 0 starts with shard 0, rank 1 with shard 1: global step 0 = shard 0 rows 0-1, shard 1 rows 0-1
    assert torch.equal(reference[0]["input_ids"], torch.cat([windows[0, :2], windows[1, :2]]))


def _read_on_rank(rank, world_size, shard_dir):
    batches = shard_batches(shard_dir, micro_batch_size=2, num_batches=3, rank=rank, world_size=world_size)
    return [b["input_ids"].tolist() for b in batches]


def test_real_gloo_ranks_match_global_reference(tmp_path):
    write_text_shards([bundled_text_path()], tmp_path, seq_len=SEQ_LEN, samples_per_shard=3, max_samples=18)
    per_rank = run_ranks(_read_on_rank, 2, str(tmp_path), timeout=120)
    reference = global_reference_batches(tmp_path, micro_batch_size=2, num_batches=3, world_size=2)
    for step, batch in enumerate(reference):
        assert batch["input_ids"].tolist() == per_rank[0][step] + per_rank[1][step]


def test_reads_are_deterministic_and_shards_reproducible(tmp_path):
    for out in ("a", "b"):
        write_text_shards([bundled_text_path()], tmp_path / out, seq_len=SEQ_LEN, samples_per_shard=4,
                          max_samples=16)
    shard_bytes = {out: [p.read_bytes() for p in sorted((tmp_path / out).glob("*.tar"))] for out in "ab"}
    assert len(shard_bytes["a"]) == 4 and shard_bytes["a"] == shard_bytes["b"]  # byte-identical tars
    first = shard_batches(tmp_path / "a", micro_batch_size=2, num_batches=4, rank=1, world_size=2)
    second = shard_batches(tmp_path / "a", micro_batch_size=2, num_batches=4, rank=1, world_size=2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second, strict=True))


def test_shard_list_and_brace_pattern_select_shards(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=12, samples_per_shard=3)  # 4 shards
    chosen = [tmp_path / "calib-000003.tar", tmp_path / "calib-000001.tar"]
    ids = _ids(shard_batches(chosen, micro_batch_size=3, num_batches=2))[:, 0]
    assert torch.equal(ids, torch.tensor([9.0, 10, 11, 3, 4, 5]))
    pattern = str(tmp_path / "calib-{000002..000003}.tar")
    ids = _ids(shard_batches(pattern, micro_batch_size=2, num_batches=3))[:, 0]
    assert torch.equal(ids, torch.arange(6.0, 12.0))
    with pytest.raises(ValueError, match=r"\['calib-000009.tar'\] are not listed in .*metadata.json"):
        shard_batches(tmp_path / "calib-000009.tar", micro_batch_size=1, num_batches=1)
    with pytest.raises(ValueError, match="several directories"):
        shard_batches([chosen[0], tmp_path / "other" / "calib-000000.tar"], micro_batch_size=1,
                            num_batches=1)


# ---------------------------------------------------------------- validation errors


def test_no_shards_found(tmp_path):
    with pytest.raises(ValueError, match="no shards found.*write_text_shards"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1)
    with pytest.raises(ValueError, match="no shards found"):
        shard_batches([], micro_batch_size=1, num_batches=1)
    with pytest.raises(ValueError, match=f"no shards found: {tmp_path / 'absent'}/metadata.json does not exist"):
        shard_batches(tmp_path / "absent", micro_batch_size=1, num_batches=1)
    (tmp_path / "stray.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="1 tar files there, e.g. stray.tar, have no manifest"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1)


def test_fewer_shards_than_ranks(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=4, samples_per_shard=2)
    with pytest.raises(ValueError, match="2 shards for 3 ranks; write at least 3 shards.*samples_per_shard"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1, rank=0, world_size=3)


def test_rank_with_too_few_samples_fails_on_every_rank(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=18, samples_per_shard=4)  # shards 4,4,4,4,2: ranks 10 and 8
    shard_batches(tmp_path, micro_batch_size=4, num_batches=2, rank=1, world_size=2)  # 8 fit
    for rank in (0, 1):
        with pytest.raises(ValueError, match=r"rank 1 has 8 samples.*needs micro_batch_size\*num_batches = 9"):
            shard_batches(tmp_path, micro_batch_size=3, num_batches=3, rank=rank, world_size=2)


def test_missing_shard_listed_in_metadata(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=8, samples_per_shard=2)
    (tmp_path / "calib-000001.tar").unlink()
    with pytest.raises(ValueError, match="missing.*calib-000001.tar"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1, rank=0, world_size=2)


def test_truncated_shard_is_named(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=8, samples_per_shard=4)
    shard = tmp_path / "calib-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ValueError, match="calib-000001.tar is 3000 bytes.*truncated"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1)


@pytest.mark.parametrize("cut, message", [
    (1000, "calib-000000.tar is truncated or corrupt"),  # inside the first member's data
    (5120, "calib-000000.tar holds 1 samples but metadata.json records 4"),  # on a member boundary
])
def test_truncated_shard_with_matching_metadata_is_caught_by_reading(tmp_path, cut, message):
    _numbered_tensor_shards(tmp_path, num_samples=8, samples_per_shard=4)
    shard = tmp_path / "calib-000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    meta_path = tmp_path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["num_bytes"] = cut  # the size check passes: only reading the tar can tell
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1)


def test_corrupt_shard_header_is_named(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=8, samples_per_shard=4)
    shard = tmp_path / "calib-000000.tar"
    data = bytearray(shard.read_bytes())
    data[:512] = b"\xff" * 512  # same size, garbage first header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="calib-000000.tar is truncated or corrupt"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1)


def test_changed_byte_inside_a_sample_is_caught_by_the_digest(tmp_path):
    write_text_shards([bundled_text_path()], tmp_path, seq_len=SEQ_LEN, samples_per_shard=4, max_samples=8)
    shard = tmp_path / "calib-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 1  # same size, tar headers intact: only the digest can tell
    shard.write_bytes(bytes(data))
    shard_batches(tmp_path, micro_batch_size=4, num_batches=1)  # shard 0 alone is fine
    with pytest.raises(ValueError, match="calib-000001.tar is truncated or corrupt: its sha256 differs"):
        shard_batches(tmp_path, micro_batch_size=4, num_batches=2)


def test_token_ids_are_checked_against_the_models_vocabulary(tmp_path):
    from gradprobe_dist.models import SimpleMLP, TinyGPT, TinyGPTConfig

    write_text_shards([bundled_text_path()], tmp_path / "text", seq_len=SEQ_LEN, samples_per_shard=4, max_samples=8)
    assert len(shard_batches(tmp_path / "text", micro_batch_size=4, num_batches=2, vocab_size=256)) == 2
    with pytest.raises(ValueError, match=r"tokenised with 'bytes' \(vocabulary 256\), but the model's vocabulary "
                                         r"has 100 tokens"):
        shard_batches(tmp_path / "text", micro_batch_size=4, num_batches=2, vocab_size=100)
    _numbered_tensor_shards(tmp_path / "tensor", num_samples=4, samples_per_shard=2)
    with pytest.raises(ValueError, match="hold tensor samples, but the model takes token ids"):
        shard_batches(tmp_path / "tensor", micro_batch_size=1, num_batches=1, vocab_size=256)
    assert token_vocab_size(TinyGPT(TinyGPTConfig(vocab_size=100, n_layer=1, n_embd=8, n_head=2))) == 100
    assert token_vocab_size(SimpleMLP(4, [3], 2)) is None


def test_existing_shards_are_refused_and_overwrite_replaces_them(tmp_path):
    write_text_shards([bundled_text_path()], tmp_path, seq_len=SEQ_LEN, samples_per_shard=2, max_samples=8)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="already holds shards.*overwrite"):
        write_text_shards([bundled_text_path("valid")], tmp_path, seq_len=SEQ_LEN, samples_per_shard=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    write_text_shards([bundled_text_path("valid")], tmp_path, seq_len=SEQ_LEN, samples_per_shard=4,
                      max_samples=4, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["calib-000000.tar"]  # no stale shard left
    with pytest.raises(ValueError, match="is a file, not a directory"):
        write_text_shards([bundled_text_path()], tmp_path / "metadata.json", seq_len=SEQ_LEN, samples_per_shard=2)


def test_bad_arguments_name_the_problem(tmp_path):
    _numbered_tensor_shards(tmp_path, num_samples=4, samples_per_shard=2)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_batch_size must be at least 1"):
        shard_batches(tmp_path, micro_batch_size=0, num_batches=1)
    with pytest.raises(TypeError, match="num_batches must be an int"):
        shard_batches(tmp_path, micro_batch_size=1, num_batches=2.0)
    with pytest.raises(ValueError, match="38912 tokens, fewer than seq_len=100000; add text or lower seq_len"):
        write_text_shards([bundled_text_path("valid")], tmp_path / "t", seq_len=100_000, samples_per_shard=1)
    with pytest.raises(ValueError, match="same first dimension"):
        write_tensor_shards(torch.ones(3, 2), torch.ones(4), tmp_path / "u", samples_per_shard=1)


# ---------------------------------------------------------------- bundled data


def test_bundled_texts_are_separate_and_small():
    train, valid = bundled_text_path("train"), bundled_text_path("valid")
    assert train.stat().st_size <= 290_000 and train.stat().st_size + valid.stat().st_size < 300_000
    assert valid.read_text().startswith("HAMLET, PRINCE OF DENMARK")
    assert "Hamlet" not in train.read_text() and "HAMLET" not in train.read_text()
    assert (train.parent / "ATTRIBUTION.md").is_file()
    with pytest.raises(ValueError, match="use one of"):
        bundled_text_path("test")
