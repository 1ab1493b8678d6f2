"""graphgen verify: the tier gates on hand-made rows, the tiny artifacts (eager and Inductor) pass,
the report lands in the artifact outside its checksums, and a deliberately broken decode layer is
found at its tier, step and layer."""
from __future__ import annotations

import json

import pytest
import torch

import graphgen.compiler as compiler
from graphgen.artifact import read_manifest
from graphgen.verify import (FLOOR, MULTIPLIER, REPORT_FILE, VerifyError, compare, compare_tokens, print_report,
                             verify_artifact)
from models import tiny_recipe


# --- gates ------------------------------------------------------------------------------------
def test_compare_gate_is_relative_to_the_eager_error():
    ref = torch.randn(100, dtype=torch.float64)
    eager = ref + 1e-3 * torch.randn(100, dtype=torch.float64)
    ok = compare(ref + 2e-3 * torch.randn(100, dtype=torch.float64), eager, ref, "bfloat16", prompt=0, step=0)
    assert ok.passed and ok.limit == pytest.approx(MULTIPLIER["bfloat16"] * ok.eager_error + FLOOR)
    bad = compare(ref + 1e-2 * torch.randn(100, dtype=torch.float64), eager, ref, "bfloat16", prompt=0, step=0)
    assert not bad.passed and bad.graph_error > bad.limit
    # fp32: an eager error at roundoff leaves only the tight absolute floor.
    exact = ref.float().double()
    assert compare(exact + 5e-6, exact, ref, "float32", prompt=0, step=0).passed
    assert not compare(exact + 5e-5, exact, ref, "float32", prompt=0, step=0).passed


def test_token_tier_exact_near_tie_and_stop():
    eager_logits = torch.tensor([[0.0, 5.0, 1.0, -3.0], [2.0, 1.99, -5.0, -6.0], [9.0, 0.0, 0.0, 0.0]])
    graph_logits = eager_logits.clone()
    graph_logits[1] = torch.tensor([1.99, 2.0, -5.0, -6.0])  # a near-tie flips at step 1
    graph_logits[2] = torch.tensor([0.0, 0.0, 0.0, 9.0])  # after the divergence: not compared
    tokens = [1, 0, 0]
    row = compare_tokens(0, tokens, graph_logits, eager_logits, exact=False, top_k=2)
    assert row.passed and row.diverged_at == 1 and row.near_tie and row.graph == [1, 1]
    assert not compare_tokens(0, tokens, graph_logits, eager_logits, exact=True, top_k=2).passed
    far = eager_logits.clone()
    far[1] = torch.tensor([-9.0, -9.0, -9.0, 3.0])  # graph's token is last in eager's ranking
    row = compare_tokens(0, tokens, far, eager_logits, exact=False, top_k=2)
    assert not row.passed and row.near_tie is False and "step 1" in row.detail
    assert compare_tokens(0, tokens, eager_logits, eager_logits, exact=True, top_k=1).diverged_at is None


# --- artifacts --------------------------------------------------------------------------------
def test_eager_artifact_passes_with_layers_and_writes_the_report(tiny_eager_artifact):
    report = verify_artifact(tiny_eager_artifact, max_new_tokens=4, layers=True)
    assert report.passed, report.first_failure
    assert report.backend == "eager" and report.exact_tokens
    # the later prompts join mid-decode: the mixed graph computes their prompts, so all graphs ran
    assert report.graph_steps["prefill"] == 1 and report.graph_steps["mixed"] >= 1 and report.graph_steps["decode"]
    n_prompts = len(report.prompts)
    assert len(report.prefill) == len(report.decode) == n_prompts and len(report.decode_steps) == n_prompts * 3
    assert all(r.diverged_at is None for r in report.tokens)  # identical greedy tokens
    assert {r.layer for r in report.layers} == {0, 1} and report.first_divergent_layer is None
    data = json.loads((tiny_eager_artifact / REPORT_FILE).read_text())
    assert data["passed"] and data["first_failure"] is None and data["tiers"] == {
        "prefill": True, "decode": True, "tokens": True}
    assert data["manifest_sha256"] == report.manifest_sha256
    # report/verify.json is outside the checksummed set: the artifact still loads with checks.
    manifest = read_manifest(tiny_eager_artifact, verify=True)
    assert REPORT_FILE not in manifest.data["files"]


def test_inductor_artifact_passes(tiny_artifact):
    report = verify_artifact(tiny_artifact, prompts=["Hello, world!", [256, 84, 104, 101]], max_new_tokens=4)
    assert report.backend == "inductor" and not report.exact_tokens
    assert report.passed, report.first_failure
    assert report.graph_steps["mixed"] >= 1


def test_print_report_and_bad_arguments(tiny_eager_artifact):
    from rich.console import Console

    report = verify_artifact(tiny_eager_artifact, prompts=[[256, 72, 105]], max_new_tokens=2, write=False)
    console = Console(record=True, width=120)
    print_report(report, console)
    text = console.export_text()
    assert "prefill" in text and "decode" in text and "verify passed" in text
    with pytest.raises(VerifyError, match="max_model_len"):
        verify_artifact(tiny_eager_artifact, prompts=[[256] * 250], max_new_tokens=16, write=False)


@pytest.mark.slow
def test_a_broken_decode_layer_is_named(tmp_path, monkeypatch):
    """Layer 1's decode attention gets 3x its scale: prefill passes, decode fails at step 1, and
    --layers names layer 1 (decode phase) while layer 0 agrees."""
    original = compiler.paged_attention

    def broken(gm, phase, spec):
        gm, record = original(gm, phase, spec)
        if phase == "decode":
            for node in gm.graph.nodes:
                if node.meta.get("graphgen_layer") == 1:
                    node.kwargs = {**node.kwargs, "scale": node.kwargs["scale"] * 3}
            gm.recompile()
        return gm, record

    monkeypatch.setattr(compiler, "paged_attention", broken)
    result = compiler.compile_recipe(tiny_recipe("llama"), output=tmp_path / "broken")
    report = verify_artifact(result.path, prompts=["The quick brown fox"], max_new_tokens=3, layers=True)
    assert not report.passed
    assert report.tier_passed["prefill"] and not report.tier_passed["decode"]
    fail = report.first_failure
    assert (fail["tier"], fail["prompt"], fail["step"], fail["layer"]) == ("decode", 0, 1, 1)
    layer = report.first_divergent_layer
    assert (layer.layer, layer.phase) == (1, "decode")
    assert all(r.passed for r in report.layers if r.layer == 0)
    assert json.loads((result.path / REPORT_FILE).read_text())["passed"] is False
