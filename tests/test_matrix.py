"""The architecture matrix: each decoder architecture compiled (tiny config, fixed seed), verified
against HF eager in float32 and bfloat16, and linted for NPU expressibility with the exact reason.

Cells vary GQA ratio (1, 2, 4, 8), head_dim (8 and 24 -> zero-padded, 16, 64, 80, 128), block_size
(16, 32, 128) and both KV layouts (each architecture takes one layout at float32 and the other at
bfloat16). Every cell compiles with the eager backend (export only); a representative subset also
compiles with Inductor (AOTInductor, ~25 s a graph here): the NPU-op path (qwen2: GQA 4, head_dim
80, block 32, BSH at bf16) and the portable path (gemma2: softcap + alternating sliding window, BSH
at bf16). The tiny llama compiled with Inductor at float32 is verified in test_verify.py. Artifacts
are compiled once per session and shared by the verify and the lint tests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from graphgen.compiler import compile_recipe
from graphgen.verify import verify_artifact
from models import available, tiny_recipe

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Arch:
    model_type: str
    config: dict = field(default_factory=dict)  # on top of tests/models.py TINY
    block_size: int = 16
    layouts: tuple[str, str] = ("BSH", "BNSD")  # (float32, bfloat16)
    head_dim: int = 16  # the model's, for the padding expectation
    npu_blockers: frozenset[str] = frozenset()  # canonical attributes no NPU op expresses
    layers: bool = False  # also run verify --layers


ARCHS = {a.model_type: a for a in [
    Arch("llama", dict(num_attention_heads=8, num_key_value_heads=1), 16, ("BSH", "BNSD")),  # GQA 8
    Arch("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=80), 32, ("BNSD", "BSH"), 80),
    Arch("qwen3", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128), 128, ("BSH", "BNSD"), 128),
    Arch("mistral", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64), 16, ("BNSD", "BSH"), 64),
    Arch("gemma2", dict(num_attention_heads=2, num_key_value_heads=2, head_dim=64), 32, ("BNSD", "BSH"), 64,
         frozenset({"softcap"}), layers=True),
    Arch("phi3", dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=4), 16, ("BSH", "BNSD"), 24),
    Arch("gpt2", dict(n_head=4), 128, ("BNSD", "BSH")),  # MHA, learned positions
    Arch("gpt_neox", dict(hidden_size=160, num_attention_heads=2), 32, ("BSH", "BNSD"), 80),  # partial rotary
    Arch("olmo2", dict(num_attention_heads=8, num_key_value_heads=1), 16, ("BNSD", "BSH"), 8),  # GQA 8
    Arch("gpt_oss", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64), 128, ("BSH", "BNSD"), 64,
         frozenset({"sinks"}), layers=True),
]}
DTYPES = ("float32", "bfloat16")
INDUCTOR = {("qwen2", "bfloat16"), ("gemma2", "bfloat16")}
CELLS = [(m, d, "eager") for m in ARCHS for d in DTYPES] + [(m, d, "inductor") for m, d in sorted(INDUCTOR)]


def _id(cell) -> str:
    return "-".join(cell)


@pytest.fixture(scope="session")
def matrix_artifact(tmp_path_factory):
    """cell -> CompileResult, each cell compiled once per session."""
    root = tmp_path_factory.mktemp("matrix")
    built = {}

    def get(cell):
        model_type, dtype, backend = cell
        if not available(model_type):
            pytest.skip(f"this transformers has no {model_type}")
        if cell not in built:
            arch = ARCHS[model_type]
            layout = arch.layouts[DTYPES.index(dtype)]
            recipe = tiny_recipe(model_type, name=_id(cell), dtype=dtype, backend=backend, block_size=arch.block_size,
                                 layout=layout, **arch.config)
            built[cell] = compile_recipe(recipe, output=root / _id(cell))
        return built[cell]

    return get


@pytest.mark.parametrize("cell", CELLS, ids=_id)
def test_verify_passes(cell, matrix_artifact):
    result = matrix_artifact(cell)
    arch = ARCHS[cell[0]]
    report = verify_artifact(result.path, layers=arch.layers and cell[2] == "eager" and cell[1] == "float32")
    assert report.passed, json.dumps(report.to_dict()["first_failure"], indent=1)
    assert report.backend == cell[2] and report.dtype == cell[1]
    if report.layers is not None:
        assert report.first_divergent_layer is None and {r.layer for r in report.layers} == {0, 1}


@pytest.mark.parametrize("cell", [c for c in CELLS if c[2] == "eager"], ids=_id)
def test_lint_names_why_a_cell_is_not_npu_expressible(cell, matrix_artifact):
    """Expected errors follow general rules: fp32 (the NPU ops take fp16/bf16), a softcap or sinks
    (no NPU op has them). A cpu build has no extend graph (its mixed graph covers prefix hits and is
    built for cpu/cuda only, so the NPU lint has no say on it), so FIA's block-size rule for Q_S > 1
    does not come up here (tests/test_npu_lint.py covers it on an extend graph)."""
    model_type, dtype, _ = cell
    arch = ARCHS[model_type]
    path = matrix_artifact(cell).path
    lint = json.loads((path / "report" / "lint.json").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    errors = {f["rule"] for f in lint["findings"] if f["severity"] == "error"}
    expected = set(arch.npu_blockers)
    if dtype == "float32":
        expected.add("dtype")
    assert errors == expected, lint["findings"]
    assert manifest["npu_portable"] is (not expected) is lint["npu_expressible"]
    for blocker in arch.npu_blockers:  # named per layer, with the reason
        layers = {f["layer"] for f in lint["findings"] if f["rule"] == blocker}
        assert layers == {0, 1}
    padded = {f["layer"] for f in lint["findings"] if f["rule"] == "head_dim" and f["severity"] == "info"}
    assert bool(padded) == bool(arch.head_dim % 16)
    assert manifest["kv"]["layout"] == arch.layouts[DTYPES.index(dtype)]
    assert manifest["kv"]["head_dim"] == -(-arch.head_dim // 16) * 16
