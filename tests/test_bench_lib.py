"""bench.lib, the helpers the benchmarks share: ranks, memory, timers, reports, comparisons.

Each test checks what a benchmark relies on: real ranks that report their own process's
peak RSS, timers that count the library's calls without patching it, reports that carry
the machine, and sparsity counted from the weights.
"""
import json

import pytest
import torch
import torch.nn as nn

from bench.lib.compare import actual_sparsity, at_sparsity, follows_pattern, row, sparsity_gap
from bench.lib.memory import bare_import_peak_rss, peak_rss_bytes
from bench.lib.ranks import run_ranks, torchrun_module
from bench.lib.report import machine, markdown_table, run_meta, spread, write_report
from bench.lib.timing import TimedBackwardBackend, TimedStrategy
from gradprobe_dist import GradProbe, MagnitudePruning, SimpleMLP

MiB = 2**20


def sum_of_ranks_and_ballast(rank: int, world_size: int, ballast_mib: int) -> float:
    import torch.distributed as dist

    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    if rank == 1:  # touched pages count in RSS
        torch.ones(ballast_mib * MiB // 4).sum()
    return float(total)


def failing_rank(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one gives up")


def test_run_ranks_returns_every_rank_and_its_own_peak_rss():
    results = run_ranks(sum_of_ranks_and_ballast, 2, 300, timeout=300)
    assert [r.rank for r in results] == [0, 1]
    assert [r.value for r in results] == [1.0, 1.0]  # a real all-reduce over both ranks
    assert results[1].peak_rss_bytes - results[0].peak_rss_bytes > 200 * MiB  # per process, not shared


def test_run_ranks_fails_with_the_failing_ranks_traceback():
    with pytest.raises(Exception, match="rank one gives up"):
        run_ranks(failing_rank, 2, timeout=300)


def test_bare_import_floor_counts_the_imports():
    assert bare_import_peak_rss(["torch"]) > bare_import_peak_rss([]) + 50 * MiB
    assert peak_rss_bytes() > bare_import_peak_rss([])


def test_torchrun_module_records_every_ranks_peak_and_exit(tmp_path):
    good = tmp_path / "ok.json"
    good.write_text('{"a": 1}')
    result = torchrun_module("json.tool", [str(good)], nproc=2, timeout=300)
    assert result.returncode == 0, result.output[-2000:]
    assert [r["rank"] for r in result.ranks] == [0, 1]
    assert all(r["exit_code"] == 0 and r["peak_rss_bytes"] > MiB for r in result.ranks)
    assert all(r["peak_cuda_bytes"] is None for r in result.ranks)  # json.tool never imports torch
    assert result.output.count('"a": 1') == 2
    alone = torchrun_module("json.tool", [str(tmp_path / "missing.json")], nproc=None, timeout=120)
    assert alone.returncode != 0 and [r["exit_code"] for r in alone.ranks] == [alone.returncode]


def test_timers_count_the_probes_calls_through_public_interfaces():
    torch.manual_seed(0)
    model = SimpleMLP(8, (16,), 4)
    backend = TimedBackwardBackend(device="cpu")
    strategy = TimedStrategy(MagnitudePruning("layer", pattern="2:4"))
    assert strategy.nm == (2, 4)  # attributes read through to the wrapped strategy
    batches = [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
    GradProbe(model, strategy, backend=backend).probe(batches, nn.CrossEntropyLoss(), 0.5, 3, 0.1)
    assert backend.watch.calls == 6  # two passes over three batches
    assert strategy.watch.calls == 1 and strategy.watch.total.wall > 0


def test_report_carries_machine_and_command(tmp_path):
    meta = run_meta(smoke=True)
    assert meta["machine"]["torch"] == torch.__version__ and meta["machine"]["cpu_cores"] >= 1
    assert meta["command"].startswith("python")
    table = markdown_table([{"a": 1.23456, "b": None}], [("a", "A", ".2f"), ("b", "B", "d")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.23 | - |"]
    json_path, md_path = write_report(tmp_path / "out", "x", {"meta": meta, "rows": [1]}, table)
    assert json.loads(json_path.read_text())["meta"]["machine"] == meta["machine"]
    assert md_path.read_text() == table + "\n"
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "min": 1.0, "max": 3.0, "n": 2}
    assert set(machine()) >= {"date_utc", "cpu_model", "memory_gib", "gpu", "load_average_1m_at_start"}


def test_equal_sparsity_rows_are_counted_from_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    names = ["0.weight", "1.weight"]

    def magnitude(sparsity: float) -> nn.Module:
        pruned = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        pruned.load_state_dict(model.state_dict())
        for name, mask in MagnitudePruning("layer").select_weights_to_prune(pruned, sparsity).items():
            dict(pruned.named_parameters())[name].data.masked_fill_(mask, 0)
        return pruned

    assert actual_sparsity(model, names)[0] == 0
    half = magnitude(0.5)
    assert actual_sparsity(half, names) == (0.5, {"0.weight": 0.5, "1.weight": 0.5})
    rows = [row("dense", model, names, lambda m: 1.0)]
    rows += at_sparsity(0.25, {"a": magnitude, "b": magnitude}, names, lambda m: 2.0)
    assert [(r["method"], r["sparsity"], r["metric"]) for r in rows] == [
        ("dense", 0.0, 1.0), ("a", 0.25, 2.0), ("b", 0.25, 2.0)]
    assert rows[1]["requested"] == 0.25
    assert sparsity_gap(rows[1:]) == 0 and sparsity_gap(rows) == 0.25
    assert not follows_pattern(half, names, "2:4")  # half the weights, not 2 of every 4
    nm = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        nm.weight.copy_(torch.tensor([[0, 1, 0, 1, 1, 0, 0, 1.0]] * 2))
    assert follows_pattern(nm, ["weight"], "2:4") and not follows_pattern(nm, ["weight"], "3:4")
