"""graphgen bench: workload generation, the timing/ratio/roofline arithmetic, the JSON schema, and a
small real run (graphgen and HF) on the tiny artifact. No timing thresholds."""
import json
import math
import statistics

import pytest
from typer.testing import CliRunner

from graphgen import bench as B
from graphgen.cli import app


def test_fixed_workload_is_seeded_and_avoids_special_ids():
    w = B.fixed_workload(3, 20, 7, vocab_size=10, avoid={0, 1, 2}, seed=5)
    assert w.num_requests == 3 and w.output_lens == [7, 7, 7] and w.output_tokens == 21
    assert all(len(p) == 20 and not set(p) & {0, 1, 2} and max(p) < 10 for p in w.prompts)
    assert len({tuple(p) for p in w.prompts}) == 3  # different prompts per request
    assert B.fixed_workload(3, 20, 7, vocab_size=10, avoid={0, 1, 2}, seed=5) == w
    assert B.fixed_workload(3, 20, 7, vocab_size=10, avoid={0, 1, 2}, seed=6) != w
    with pytest.raises(ValueError, match="must be >= 1"):
        B.fixed_workload(0, 20, 7, vocab_size=10)


def test_mixed_workload_draws_lengths_in_range_with_a_fixed_seed():
    w = B.mixed_workload(vocab_size=32000)
    assert w.num_requests == 64
    plens = [len(p) for p in w.prompts]
    assert min(plens) >= 16 and max(plens) <= 256 and min(w.output_lens) >= 16 and max(w.output_lens) <= 128
    assert len(set(plens)) > 20 and len(set(w.output_lens)) > 20  # really drawn, not constant
    assert B.mixed_workload(vocab_size=32000) == w
    assert B.mixed_workload(vocab_size=32000, seed=1) != w
    d = w.describe()
    assert d["requests"] == 64 and d["output_tokens"] == sum(w.output_lens)
    assert d["prompt_lens"] == [min(plens), max(plens)]
    with pytest.raises(ValueError, match="prompt_lens"):
        B.mixed_workload(vocab_size=100, prompt_lens=(10, 5))


def test_fit_lengths_shrinks_the_prompt_first():
    assert B.fit_lengths(128, 128, 512) == (128, 128)
    assert B.fit_lengths(200, 100, 256) == (156, 100)
    assert B.fit_lengths(10, 400, 256) == (1, 255)


def test_static_batches_pad_to_the_longest_prompt_and_output():
    w = B.Workload("m", [[1] * 3, [1] * 9, [1] * 4, [1] * 2, [1] * 5], [5, 2, 8, 1, 3])
    assert B.static_batches(w, 2) == [([0, 1], 9, 5), ([2, 3], 4, 8), ([4], 5, 3)]
    assert B.static_batches(w, 16) == [([0, 1, 2, 3, 4], 9, 8)]


def test_run_stats_ttft_decode_rate_and_medians():
    w = B.Workload("fixed-b2", [[1], [2]], [5, 5])
    s = B.run_stats(10.0, 12.0, {0: 10.5, 1: 10.7}, {0: 11.9, 1: 12.0}, w, decode=True)
    assert s.seconds == pytest.approx(2.0) and s.output_tokens == 10
    assert s.ttft_s == pytest.approx(0.6)
    assert s.decode_tok_s == pytest.approx(8 / (12.0 - 10.7))  # tokens after the first / after the last first
    assert s.tokens_per_s == pytest.approx(5.0)
    assert B.run_stats(10.0, 12.0, {0: 10.5, 1: 10.7}, {0: 11.9, 1: 12.0}, w, decode=False).decode_tok_s is None
    runs = [B.RunStats(3.0, 10, 0.1, 5.0), B.RunStats(1.0, 10, 0.3, 7.0), B.RunStats(2.0, 10, 0.2, None)]
    m = B.median_stats(runs)
    assert (m.seconds, m.ttft_s, m.decode_tok_s) == (2.0, 0.2, 6.0)


def test_model_bytes_counts_one_embedding_row_unless_tied():
    shapes = {"model.embed_tokens.weight": (100, 8), "model.layers.0.mlp.w": (8, 8), "lm_head.weight": (100, 8)}
    untied = B.model_bytes(shapes, 4, kv_bytes_per_token=16, tied_embeddings=False)
    assert untied.parameters == 1664 and untied.weight_bytes == 1664 * 4
    assert untied.step_weight_bytes == (1664 - 99 * 8) * 4
    assert untied.step_bytes(10) == untied.step_weight_bytes + 160
    greedy = B.model_bytes(shapes, 4, kv_bytes_per_token=16, tied_embeddings=False, int8_head="lm_head.weight")
    assert untied.step_weight_bytes - greedy.step_weight_bytes == math.prod(shapes["lm_head.weight"]) * 3
    tied = B.model_bytes({k: v for k, v in shapes.items() if k != "lm_head.weight"}, 2, kv_bytes_per_token=0,
                         tied_embeddings=True)
    assert tied.step_weight_bytes == tied.weight_bytes == (800 + 64) * 2


def test_roofline_and_ratio_arithmetic():
    r = B.roofline(10e9, 400e6, 20.0)
    assert r["tok_s"] == pytest.approx(25.0) and r["fraction"] == pytest.approx(0.8)
    assert r["bytes_per_step"] == 400_000_000
    assert B.roofline(10e9, 400e6, None)["fraction"] is None
    assert B.ratio(8.0, 2.0) == 4.0
    assert B.ratio(None, 2.0) is None and B.ratio(3.0, None) is None and B.ratio(3.0, 0.0) is None


def test_read_bandwidth_is_a_positive_rate():
    bw = B.read_bandwidth(4 << 20, repeats=2)
    assert math.isfinite(bw) and bw > 0


FIXED_KEYS = {"batch_size", "workload", "graphgen", "hf", "speedup"}
STATS_KEYS = {"seconds", "output_tokens", "tokens_per_s", "ttft_s", "decode_tok_s"}


def _check_schema(d: dict, *, hf: bool, mixed: bool) -> None:
    assert d["schema"] == B.SCHEMA
    assert set(d) == {"schema", "artifact", "machine", "settings", "fixed", "mixed", "roofline", "skipped"}
    assert {"name", "dtype", "parameters", "weight_bytes", "load_seconds", "peak_rss_mib"} <= set(d["artifact"])
    assert d["artifact"]["load_seconds"] > 0 and d["artifact"]["peak_rss_mib"] > 0
    assert d["machine"]["threads"] >= 1 and d["machine"]["device"] == "cpu"
    samples = d["machine"]["read_bandwidth_samples_gb_s"]  # after the warm-ups, then before each graphgen run
    timed = (len(d["fixed"]) + (d["mixed"] is not None)) * d["settings"]["repeats"]
    assert len(samples) == 1 + timed and min(samples) > 0
    assert d["machine"]["read_bandwidth_gb_s"] == pytest.approx(statistics.median(samples))
    assert {"bytes_per_step", "tok_s", "fraction", "context_len"} == set(d["roofline"])
    assert 0 < d["roofline"]["fraction"]
    for row in d["fixed"]:
        assert set(row) == FIXED_KEYS and set(row["graphgen"]) == STATS_KEYS
        assert row["graphgen"]["decode_tok_s"] > 0 and row["graphgen"]["ttft_s"] > 0
        assert row["workload"]["requests"] == row["batch_size"]
        if hf:
            assert set(row["hf"]) == STATS_KEYS and row["speedup"] == pytest.approx(
                row["graphgen"]["decode_tok_s"] / row["hf"]["decode_tok_s"])
        else:
            assert row["hf"] is None and row["speedup"] is None
    if mixed:
        mx = d["mixed"]
        assert mx["graphgen"]["tokens_per_s"] > 0 and mx["graphgen"]["decode_tok_s"] is None
        if hf:
            assert mx["speedup"] == pytest.approx(mx["graphgen"]["tokens_per_s"] / mx["hf"]["tokens_per_s"])
    else:
        assert d["mixed"] is None


@pytest.mark.slow
def test_bench_function_fixed_and_mixed_vs_hf(tiny_artifact):
    report = B.bench(tiny_artifact, batch_sizes=[1, 2, 64], workloads=("fixed", "mixed"), vs_hf=True,
                     prompt_len=8, output_len=6, repeats=1, mixed_requests=5)
    d = json.loads(json.dumps(report.to_dict()))
    _check_schema(d, hf=True, mixed=True)
    assert [r["batch_size"] for r in d["fixed"]] == [1, 2]
    assert any("batch 64" in line for line in d["skipped"])  # above the largest decode bucket: said, not silent
    assert d["mixed"]["workload"]["requests"] == 5 and d["mixed"]["max_num_seqs"] == 8


@pytest.mark.slow
def test_hf_runs_in_a_process_of_its_own(tiny_artifact, tmp_path):
    """HF's generate runs in a spawned process (glibc's default allocator settings, not the ones
    graphgen's runtime sets for its own process): it does the same work as HF here, the process is
    gone after close, a failure there is raised here with its reason, and so is a process that
    died."""
    import os
    import shutil

    import torch

    from graphgen.artifact import read_manifest

    w = B.fixed_workload(2, 5, 4, vocab_size=read_manifest(tiny_artifact).data["model_config"]["vocab_size"])
    hf = B.HFProcess(tiny_artifact, torch.device("cpu"), 1)
    try:
        there = hf.run(w, 2, decode=True)
        assert hf._proc.pid != os.getpid() and hf.alive()
    finally:
        hf.close()
    assert not hf.alive()
    model, pad = B._load_hf(read_manifest(tiny_artifact), torch.device("cpu"))
    assert pad == hf.pad_token_id
    here = B.run_hf(model, w, 2, pad, decode=True)
    assert there.output_tokens == here.output_tokens == 8

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    shutil.rmtree(read_manifest(broken).model_dir)
    with pytest.raises(RuntimeError, match="HF generate failed in its process"):
        B.HFProcess(broken, torch.device("cpu"), 1)

    hf = B.HFProcess(tiny_artifact, torch.device("cpu"), 1)
    hf._proc.kill()
    hf._proc.wait()
    with pytest.raises(RuntimeError, match=r"the HF process exited \(exit code -9\) before answering"):
        hf.run(w, 2, decode=True)
    assert hf._conn.closed


@pytest.mark.slow
def test_cli_bench_json_on_the_tiny_artifact(tiny_artifact):
    result = CliRunner().invoke(app, ["bench", str(tiny_artifact), "--batch-sizes", "1", "--workload", "fixed",
                                      "--prompt-len", "8", "--output-len", "5", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout.strip().splitlines()[-1])
    _check_schema(d, hf=False, mixed=False)
    assert d["fixed"][0]["workload"]["prompt_lens"] == [8, 8] and d["fixed"][0]["graphgen"]["output_tokens"] == 5


@pytest.mark.slow
def test_cli_bench_table_on_the_tiny_artifact(tiny_artifact):
    result = CliRunner().invoke(app, ["bench", str(tiny_artifact), "--batch-sizes", "2", "--workload", "fixed",
                                      "--prompt-len", "4", "--output-len", "4", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "decode" in result.stdout and "roofline" in result.stdout


def test_cli_bench_rejects_bad_options(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", str(tmp_path), "--batch-sizes", "1,x"])
    assert bad.exit_code == 1 and "--batch-sizes" in bad.output
    bad = runner.invoke(app, ["bench", str(tmp_path), "--workload", "huge"])
    assert bad.exit_code == 1 and "--workload" in bad.output
    missing = runner.invoke(app, ["bench", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "manifest" in missing.output
