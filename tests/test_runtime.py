"""The runtime end to end: greedy equals HF eager, batching, preemption, prefix caching, sampling,
refusing broken artifacts."""
import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphgen.artifact import ArtifactError, read_manifest
from graphgen.runtime.engine import LLM
from graphgen.runtime.params import SamplingParams

PROMPTS = [
    [256, 72, 101, 108, 108, 111],
    [256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110, 32, 102, 111, 120],
    [256, 65],
    [256, 103, 114, 97, 112, 104, 103, 101, 110, 58, 32],
]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(tiny_artifact):
    return AutoModelForCausalLM.from_pretrained(tiny_artifact / "model", attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def llm(tiny_artifact):
    return LLM(tiny_artifact)


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def expected(hf):
    return [hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.slow
def test_single_prompt_matches_hf_greedy(llm, expected):
    (out,) = llm.generate([PROMPTS[0]], GREEDY)
    assert out.token_ids == expected[0]
    assert out.finish_reason == "length"
    llm.block_manager.check_all_free()


@pytest.mark.slow
def test_mixed_batch_matches_hf_greedy(llm, expected):
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == expected
    llm.block_manager.check_all_free()


@pytest.mark.slow
def test_staggered_requests_match_hf_greedy(llm, expected):
    """Requests that arrive while others decode join the running batch, outputs unchanged."""
    ids, outputs = {}, {}
    for i, prompt in enumerate(PROMPTS):
        ids[llm.add_request(prompt, GREEDY)] = i
        for _ in range(3):  # a few steps before the next request arrives
            for event in llm.step():
                if event.output is not None:
                    outputs[ids[event.request_id]] = event.output
    while llm.has_unfinished_requests():
        for event in llm.step():
            if event.output is not None:
                outputs[ids[event.request_id]] = event.output
    assert [outputs[i].token_ids for i in range(len(PROMPTS))] == expected
    llm.block_manager.check_all_free()


@pytest.mark.slow
@pytest.mark.parametrize("step_tokens", [9, 0])
def test_chunked_prompts_beside_decode_rows_match_hf_greedy(tiny_artifact, expected, step_tokens):
    """step_tokens 9: 8 decoding sequences leave 1 token a step for a prompt, so prompts arriving
    mid-decode go in 1-token chunks through the mixed graph; 0: separate prefill and decode steps."""
    llm = LLM(tiny_artifact, step_tokens=step_tokens)
    prompts = PROMPTS * 3  # 12 requests, 8 running at most: the last four arrive mid-decode
    params = [SamplingParams(max_tokens=12 - i % 5, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [expected[i % 4][:12 - i % 5] for i in range(len(prompts))]
    steps = llm.stats.to_dict()["steps"]
    assert (steps["mixed"] > 0) == (step_tokens > 0)
    assert llm.stats.mixed_prefill_tokens > 0 if step_tokens else llm.stats.mixed_prefill_tokens == 0
    llm.block_manager.check_all_free()


def test_step_tokens_outside_what_a_step_holds_is_refused(tiny_eager_artifact):
    with pytest.raises(ValueError, match="step_tokens=8: a mixed step holds a decode row"):
        LLM(tiny_eager_artifact, step_tokens=8)  # max_num_seqs 8


@pytest.mark.slow
def test_batch_composition_does_not_change_outputs(llm):
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    together = [o.token_ids for o in llm.generate(PROMPTS[::-1], GREEDY)][::-1]
    assert alone == together


@pytest.mark.slow
def test_preemption_completes_every_request_with_the_same_outputs(tiny_artifact, expected):
    # 4 usable blocks of 16 tokens: the four requests cannot all hold their KV at once.
    small = LLM(tiny_artifact, num_blocks=5, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = small.generate(PROMPTS, params)
    full = LLM(tiny_artifact, enable_prefix_caching=False).generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in full]
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.token_ids[:12] for o in outs] == expected
    small.block_manager.check_all_free()


@pytest.mark.slow
def test_prefix_caching_reuses_blocks_without_changing_outputs(tiny_artifact, hf):
    prefix = [256] + list(range(40, 80))  # 41 tokens: two full blocks shareable
    prompts = [prefix + [90, 91], prefix + [92, 93, 94]]
    llm = LLM(tiny_artifact)
    first = llm.generate(prompts[:1], GREEDY)[0]
    hits_before = llm.block_manager.stats.hit_blocks
    second = llm.generate(prompts[1:], GREEDY)[0]
    assert llm.block_manager.stats.hit_blocks - hits_before == 2
    assert first.token_ids == hf_greedy(hf, prompts[0], GREEDY.max_tokens)
    assert second.token_ids == hf_greedy(hf, prompts[1], GREEDY.max_tokens)
    llm.block_manager.check_all_free()


@pytest.mark.slow
def test_sampling_seeds_top_k_and_stop_strings(llm, expected):
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], sampled)[0].token_ids
    b = llm.generate([PROMPTS[0], PROMPTS[1]], [sampled, SamplingParams(max_tokens=4)])[0].token_ids
    assert a == b  # the seed reproduces, whatever else is in the batch
    top1 = SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=1, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], top1)[0].token_ids == expected[0]
    text = llm.generate([PROMPTS[3]], GREEDY)[0].text
    stop = text[2:4]
    cut = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    llm.block_manager.check_all_free()


@pytest.mark.slow
def test_request_that_cannot_fit_fails_alone(llm, expected):
    too_long = [256] + [65] * 300  # max_model_len is 256
    outs = llm.generate([too_long, PROMPTS[0]], GREEDY)
    assert outs[0].finish_reason == "abort" and "max_model_len" in outs[0].error
    assert outs[1].token_ids == expected[0]


@pytest.mark.slow
def test_stream_yields_tokens_as_they_come(llm, expected):
    events = list(llm.stream([PROMPTS[0]], GREEDY))
    tokens = [e.token_id for e in events if e.output is None]
    assert tokens == expected[0]
    assert events[-1].output is not None and events[-1].finished


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_artifacts_are_refused_with_the_file_and_fix(tiny_eager_artifact, tmp_path):
    bad = _copy(tiny_eager_artifact, tmp_path / "checksum")
    with open(bad / "graphs" / "decode.pt2", "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match=r"decode\.pt2: checksum mismatch.*graphgen compile"):
        LLM(bad)

    old = _copy(tiny_eager_artifact, tmp_path / "version")
    data = json.loads((old / "manifest.json").read_text())
    data["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"manifest\.json: artifact format version 99.*graphgen compile"):
        LLM(old)

    missing = _copy(tiny_eager_artifact, tmp_path / "missing")
    (missing / "graphs" / "prefill.pt2").unlink()
    with pytest.raises(ArtifactError, match=r"prefill\.pt2: listed in the manifest but missing"):
        LLM(missing)

    with pytest.raises(ArtifactError, match="no manifest"):
        LLM(tmp_path)


def test_corrupt_weights_are_refused_though_checked_while_they_load(tiny_eager_artifact, tmp_path):
    """The weights' checksums run beside their reading (read_manifest(weights_later=True)): a
    changed byte still refuses the artifact, and where the damage breaks the load itself the
    checksum is what the error says."""
    flipped = _copy(tiny_eager_artifact, tmp_path / "flipped")
    weights = flipped / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # a weight's byte: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: checksum mismatch.*graphgen compile"):
        LLM(flipped)
    manifest = read_manifest(flipped, weights_later=True)  # returns with the weights still being checked
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        manifest.wait_verified()
    LLM(flipped, verify_checksums=False)  # the data is not checked for you when you opt out

    cut = _copy(tiny_eager_artifact, tmp_path / "cut")
    weights = cut / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ArtifactError, match=r"model\.safetensors: checksum mismatch") as failure:
        LLM(cut)
    assert "ends past the end of the file" in str(failure.value.__context__)


def test_weights_are_read_into_one_buffer_in_the_order_asked(tmp_path):
    from safetensors.torch import load_file, save_file

    from graphgen.runtime.graphs import HUGE_PAGE, read_packed

    tensors = {"big": torch.randn(1024, 1024), "half": torch.randn(3, 5).bfloat16(), "ids": torch.arange(7),
               "flag": torch.tensor([True, False]), "scalar": torch.tensor(2.5, dtype=torch.float16),
               "odd": torch.randn(3)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    save_file({"other": torch.randn(4, 4)}, str(tmp_path / "v.safetensors"))
    want = {**load_file(str(tmp_path / "w.safetensors")), **load_file(str(tmp_path / "v.safetensors"))}
    order = ["odd", "other", "big", "scalar", "half", "flag", "ids"]  # not the files' order, across two files
    keep = lambda dtype: None  # noqa: E731
    got = read_packed([(tmp_path / f"{'v' if name == 'other' else 'w'}.safetensors", name, keep) for name in order])
    for name, tensor in zip(order, got):
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
        assert tensor.is_contiguous() and tensor.data_ptr() % 64 == 0, name
    starts = [t.data_ptr() for t in got]
    assert starts == sorted(starts)  # one after another, as asked
    assert got[0].untyped_storage().data_ptr() == got[-1].untyped_storage().data_ptr()  # one buffer
    if sys.platform.startswith("linux"):  # 4 MiB in all: the buffer starts on a huge page
        assert starts[0] % HUGE_PAGE == 0
    # a cast happens in the same read: floats to bf16, the rest kept
    cast = lambda dtype: torch.bfloat16 if dtype.is_floating_point else None  # noqa: E731
    big, ids = read_packed([(tmp_path / "w.safetensors", "big", cast), (tmp_path / "w.safetensors", "ids", cast)])
    assert big.dtype == torch.bfloat16 and torch.equal(big, want["big"].bfloat16()) and torch.equal(ids, want["ids"])


def test_unreadable_weights_say_which_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from graphgen.runtime.graphs import read_packed

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "w.safetensors"))
    keep = lambda dtype: None  # noqa: E731
    with pytest.raises(ArtifactError, match=r"w.safetensors: tensor 'nope' is missing"):
        read_packed([(tmp_path / "w.safetensors", "nope", keep)])
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ArtifactError, match="cut.safetensors: not a readable safetensors file.*ends past the end"):
        read_packed([(tmp_path / "cut.safetensors", "w", keep)])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + bytes(7) + b"not json at all!")
    with pytest.raises(ArtifactError, match="junk.safetensors: not a readable safetensors file"):
        read_packed([(tmp_path / "junk.safetensors", "w", keep)])


def test_loaded_weights_lie_in_use_order_in_one_buffer(tiny_artifact):
    from graphgen.runtime.graphs import load_weights

    manifest = read_manifest(tiny_artifact)
    weights = load_weights(manifest, torch.device("cpu"))
    decode = weights["decode"]
    names = list(manifest.graphs["decode"]["weights"])
    starts = [decode[name].data_ptr() for name in names]
    assert starts == sorted(starts)  # the manifest's order: the order a step reads them
    for phase, bound in weights.items():  # shared between graphs: one copy
        assert all(bound[name].data_ptr() == decode[name].data_ptr() for name in bound if name in decode), phase


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_pools_are_zeroed_and_on_huge_page_boundaries(dtype):
    from graphgen.runtime.runner import kv_pool

    for shape in [(3, 16, 64), (300, 16, 256)]:  # 12 KB or less; 2.4-4.9 MB
        pool = kv_pool(shape, dtype, torch.device("cpu"))
        assert pool.shape == shape and pool.dtype == dtype and pool.is_contiguous() and not pool.any()
        pool.fill_(1)  # writable to its last element
        if sys.platform.startswith("linux") and pool.numel() * pool.element_size() >= 2 << 20:
            assert pool.data_ptr() % (2 << 20) == 0  # the advised range starts at its first byte


def test_artifact_built_here_loads_without_an_isa_warning(tiny_artifact):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LLM(tiny_artifact)
    assert not [w for w in caught if "CPU ISA" in str(w.message)]


def test_isa_check_asks_for_every_feature_the_package_names(monkeypatch):
    from graphgen.backends.inductor import isa_runs_here

    cpu = {"_is_avx2_supported": True, "_is_avx512_supported": True, "_is_vnni_supported": True,
           "_is_amx_tile_supported": False}
    for name, value in cpu.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert isa_runs_here("avx512 avx512_vnni")  # what Inductor writes on a VNNI CPU, here one
    assert isa_runs_here("avx2")  # AVX2 kernels run on an AVX-512 CPU
    assert not isa_runs_here("avx512 avx512_vnni amx_tile")
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    assert not isa_runs_here("avx512") and isa_runs_here("avx2")


KEEP_FREED_PROBE = """
import resource, sys, torch
from graphgen.runtime.graphs import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("keep_freed_memory() did not take")
def churn():  # tensors under 32 MB, 80 MB of them, written, then freed
    xs = [torch.ones(1 << 18) for _ in range(80)]  # 80 x 1 MB
    del xs
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_faulting_pages_in_again():
    """After keep_freed_memory (the CPU runtime calls it when it loads graphs), memory a step freed
    serves the next step's allocations: no page faults. With glibc's defaults the same churn
    faulted a third of its pages in again (the heap's top trimmed on free, then regrown)."""
    import subprocess

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    pages = 3 * 80 * (1 << 20) // 4096
    assert faults("keep") < pages // 20
