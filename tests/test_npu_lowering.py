"""passes.npu_lowering: the lowered graphs match the portable ones and call torch_npu's exact schemas."""
import re
from pathlib import Path

import pytest
import torch

import graphgen.ops
from graphgen.capture.export import capture
from graphgen.capture.load import load_model
from graphgen.compiler import _example_inputs, kv_spec_for, paged_graph_module
from graphgen.passes.npu_lowering import HOST_LENGTHS, lowered_calls, npu_lowering
from graphgen.passes.paged_attention import plain_graph_module
from graphgen.recipe import Recipe, default_recipe

graphgen.ops.emulate()

# npu-ops.md section 1, the contract (kept here so the test runs without the reference checkout;
# checked against the reference file when it is there).
SCHEMAS = {
    "npu_incre_flash_attention": """(Tensor query, Tensor key, Tensor value, *,
  Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? pse_shift=None,
  SymInt[]? actual_seq_lengths=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None,
  Tensor? block_table=None, Tensor? dequant_scale1=None, Tensor? quant_scale1=None,
  Tensor? dequant_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None,
  Tensor? kv_padding_size=None, int num_heads=1, float scale_value=1.0, str input_layout="BSH",
  int num_key_value_heads=0, int block_size=0, int inner_precise=1) -> Tensor""",
    "npu_prompt_flash_attention": """(Tensor query, Tensor key, Tensor value, *,
  Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? pse_shift=None,
  int[]? actual_seq_lengths=None, Tensor? deq_scale1=None, Tensor? quant_scale1=None,
  Tensor? deq_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None,
  int num_heads=1, float scale_value=1.0, int pre_tokens=2147483647, int next_tokens=0,
  str input_layout="BSH", int num_key_value_heads=0, int[]? actual_seq_lengths_kv=None,
  int sparse_mode=0) -> Tensor""",
    "npu_fused_infer_attention_score": """(Tensor query, Tensor key, Tensor value, *,
  Tensor? pse_shift=None, Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None,
  SymInt[]? actual_seq_lengths_kv=None, Tensor? dequant_scale1=None, Tensor? quant_scale1=None,
  Tensor? dequant_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None,
  Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None,
  Tensor? key_antiquant_offset=None, Tensor? value_antiquant_scale=None,
  Tensor? value_antiquant_offset=None, Tensor? block_table=None, Tensor? query_padding_size=None,
  Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, Tensor? value_shared_prefix=None,
  SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, Tensor? key_rope=None,
  Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0,
  int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout="BSH",
  int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0,
  int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0,
  bool softmax_lse_flag=False) -> (Tensor attention_out, Tensor softmax_lse)""",
    "npu_scatter_nd_update_": "(Tensor(a!) self, Tensor indices, Tensor updates) -> Tensor(a!)",
}
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "npu-ops.md"


def _parse(name: str, text: str):
    return torch._C.parse_schema(f"npu::{name}" + " ".join(text.split()))


def test_schema_literals_match_the_reference():
    if not REFERENCE.is_file():
        pytest.skip("reference checkout not present")
    section = REFERENCE.read_text().split("## 2.")[0]
    flat = " ".join(section.split())
    for name, text in SCHEMAS.items():
        assert f"{name}{' '.join(text.split())}" in flat.replace("( ", "("), name


@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    """The tiny model's paged programs per phase (fp32: the lowering must be exact)."""
    recipe = default_recipe()
    model, _, _ = load_model(recipe.model, recipe.dtype, tmp_path_factory.mktemp("ckpt"))
    ep, _ = capture(model, max_batch=4, max_seq_len=64)
    spec = kv_spec_for(recipe, model)
    out = {}
    for phase in ("prefill", "extend", "decode"):
        gm, _ = paged_graph_module(ep, phase, spec)
        ex, dims = _example_inputs(phase, spec, recipe, torch.device("cpu"))
        with torch.no_grad():
            out[phase] = torch.export.export(gm, tuple(ex), dynamic_shapes=dims, strict=False)
    return spec, out


def _inputs(phase, spec):
    """Inputs of one call; sequence blocks start at 1 (block 0 is the scratch block)."""
    bs, m = spec.block_size, spec.max_blocks_per_seq
    table = torch.zeros(2, m, dtype=torch.int32)
    table[0, :2], table[1, :2] = torch.tensor([1, 2]), torch.tensor([3, 4])
    pools = [torch.randn(spec.pool_shape(6)) for _ in range(2 * spec.num_layers)]
    if phase == "decode":  # row 1 is a padding row: length 1 in the scratch block
        args = [torch.tensor([[5], [0]]), torch.tensor([[20], [0]]), table, torch.tensor([21, 1]),
                torch.tensor([bs + 4, 0])]
        table[1] = 0
        return args, pools, [21, 1]
    if phase == "extend":
        args = [torch.tensor([[5, 6, 7]]), torch.tensor([[17, 18, 19]]), torch.tensor([2]), table[:1], torch.tensor([20]),
                torch.tensor([2 * bs + 1, 2 * bs + 2, 2 * bs + 3])]
        return args, pools, [20]
    real, bucket = 5, 8  # one sequence of 5 tokens padded to the 8-token bucket (padding -> scratch block)
    ids = torch.tensor([[9, 8, 7, 6, 5, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    slots = torch.tensor([bs + i for i in range(real)] + [0, 1, 2])
    return [ids, pos, torch.tensor([real - 1]), torch.tensor([real, bucket]), slots], pools, None


@pytest.mark.parametrize("attention_ops", ["ifa_pfa", "fia"])
@pytest.mark.parametrize("phase", ["prefill", "decode", "extend"])
def test_lowered_graph_matches_portable(paged, phase, attention_ops):
    spec, eps = paged
    portable = plain_graph_module(eps[phase])
    lowered, record = npu_lowering(plain_graph_module(eps[phase]), phase, block_size=spec.block_size,
                                   attention_ops=attention_ops, prefill_tokens=8)
    assert record.matched == 3 * spec.num_layers  # attention + two KV writes per layer
    args, pools, host = _inputs(phase, spec)
    mine = [p.clone() for p in pools]
    want = portable(*args, *pools)
    got = lowered(*args, *mine, *([host] if host is not None else []))
    rows = slice(0, 1) if phase == "decode" else slice(None)  # decode row 1 is padding
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-5)
    for a, b in zip(mine, pools):  # KV equal outside the scratch block (padding writes land there)
        torch.testing.assert_close(a[1:], b[1:])
    ops = {n.target._schema.name for n in lowered_calls(lowered)}
    assert "npu::npu_scatter_nd_update_" in ops
    expect = {"prefill": "npu::npu_prompt_flash_attention", "decode": "npu::npu_incre_flash_attention",
              "extend": "npu::npu_fused_infer_attention_score"}[phase]
    if attention_ops == "fia":
        expect = "npu::npu_fused_infer_attention_score"
    assert expect in ops
    assert not [n for n in lowered.graph.nodes if n.op == "call_function"
                and getattr(n.target, "namespace", None) == "graphgen"]


def _check_arg(arg: torch._C.Argument, value, where: str):
    t = str(arg.type)
    if t.startswith("Optional[") and value is None:
        return
    t = t.removeprefix("Optional[").removesuffix("]")
    if t == "Tensor":
        assert isinstance(value, torch.fx.Node), f"{where}: {arg.name} must be a tensor node"
    elif t in ("List[int]", "int[]", "SymInt[]", "List[SymInt]"):
        assert isinstance(value, torch.fx.Node) or (
            isinstance(value, list) and all(isinstance(x, int) for x in value)), f"{where}: {arg.name}={value}"
    elif t in ("int", "SymInt"):
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {arg.name}={value!r}"
    elif t == "float":
        assert isinstance(value, (float, int)), f"{where}: {arg.name}={value!r}"
    elif t == "str":
        assert isinstance(value, str), f"{where}: {arg.name}={value!r}"
    elif t == "bool":
        assert isinstance(value, bool), f"{where}: {arg.name}={value!r}"


@pytest.mark.parametrize("attention_ops", ["ifa_pfa", "fia"])
def test_lowered_calls_follow_torch_npu_schemas(paged, attention_ops):
    spec, eps = paged
    checked = 0
    for phase in ("prefill", "decode", "extend"):
        gm, _ = npu_lowering(plain_graph_module(eps[phase]), phase, block_size=spec.block_size,
                             attention_ops=attention_ops, prefill_tokens=16)
        for node in lowered_calls(gm):
            name = node.target._schema.name.split("::")[1]
            want = _parse(name, SCHEMAS[name])
            have = node.target._schema
            # names, types, kwarg-only-ness and defaults, argument by argument
            assert [(a.name, str(a.type), a.kwarg_only, a.default_value) for a in have.arguments] == \
                   [(a.name, str(a.type), a.kwarg_only, a.default_value) for a in want.arguments], name
            positional = [a for a in want.arguments if not a.kwarg_only]
            assert len(node.args) <= len(positional)
            by_name = {a.name: a for a in want.arguments}
            for arg, value in zip(positional, node.args):
                _check_arg(arg, value, f"{phase}.{node.name}")
            for key, value in node.kwargs.items():
                assert key in by_name, f"{phase}.{node.name}: unknown argument {key}"
                _check_arg(by_name[key], value, f"{phase}.{node.name}")
            checked += 1
            if name == "npu_prompt_flash_attention":
                assert node.kwargs["actual_seq_lengths"] == [16] == node.kwargs["actual_seq_lengths_kv"]
                mask = node.kwargs["atten_mask"]
                assert mask.op == "get_attr" and mask.target == "compressed_causal_mask"
            if name == "npu_incre_flash_attention":
                assert node.kwargs["actual_seq_lengths"].name == HOST_LENGTHS["decode"][0]
    assert checked >= 9


def test_kv_write_indices_are_block_offset_pairs(paged):
    spec, eps = paged
    gm, _ = npu_lowering(plain_graph_module(eps["decode"]), "decode", block_size=spec.block_size)
    seen = []

    def spy(cache, indices, updates):
        seen.append(indices.clone())
        return torch.ops.graphgen.npu_scatter_nd_update_(cache, indices, updates)

    for node in lowered_calls(gm):
        if node.target is torch.ops.npu.npu_scatter_nd_update_.default:
            node.target = spy
    gm.recompile()
    args, pools, host = _inputs("decode", spec)
    gm(*args, *pools, host)
    bs = spec.block_size
    assert seen and all(torch.equal(i, torch.tensor([[1, 4], [0, 0]])) for i in seen), seen[0]
    assert all(0 <= int(i[:, 1].max()) < bs for i in seen)


def test_prefill_needs_its_bucket_and_the_npu_ops(paged):
    spec, eps = paged
    with pytest.raises(ValueError, match="prefill_tokens"):
        npu_lowering(plain_graph_module(eps["prefill"]), "prefill", block_size=spec.block_size)
    with pytest.raises(ValueError, match="attention_ops"):
        npu_lowering(plain_graph_module(eps["decode"]), "decode", block_size=16, attention_ops="sdpa")


def test_graph_source_has_no_pickles_and_rebinds_the_device(paged):
    from graphgen.backends.torchair import build_module, graph_source

    spec, eps = paged
    gm, _ = npu_lowering(plain_graph_module(eps["decode"]), "decode", block_size=spec.block_size)
    src, attrs = graph_source(gm)
    assert "torch.ops.npu.npu_incre_flash_attention.default" in src and re.search(r"def forward\(self", src)
    consts = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    module = build_module(src, attrs, {k: v.detach() for k, v in consts.items()}, device="cpu", name="M")
    args, pools, host = _inputs("decode", spec)
    p2 = [p.clone() for p in pools]
    torch.testing.assert_close(module(*args, *pools, host), gm(*args, *p2, host))
