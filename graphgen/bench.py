"""`graphgen bench`: how fast an artifact serves, beside HF `generate` on the same weights and beside
the machine's limit, in one run.

Workloads (token ids drawn with a fixed seed, output lengths forced: EOS is ignored):
  fixed   B requests of one prompt length and one output length, all at once: decode tokens/s
          (tokens after each request's first / time after the batch's first tokens) and TTFT.
  mixed   64 requests, prompt lengths 16-256 and output lengths 16-128 (uniform), all queued at
          once: serving throughput (output tokens / wall time). graphgen batches continuously; HF
          runs static batches of max_num_seqs requests, left-padded, each until its longest output.

Roofline: the machine's read bandwidth (best of a few streaming reads of a buffer as large as the
weights a decode step reads) over the bytes one batch-1 decode step reads (every weight but the
input embedding table, of which one row, plus the KV of the average context; an LM head the runtime
reads as its int8 copy at that size) is the fastest a
memory-bound decode can go; batch-1 decode is reported as a fraction of it. The bandwidth is
sampled after the warm-ups and again before each of graphgen's timed runs, and the roofline takes
the median of the samples: on a shared host the bandwidth can move by 2x from one minute to the
next (~33 and ~60 GB/s on the development VM), and with a single sample taken before the timed
runs, benches minutes apart put batch-1 decode at 63% and at 94% of the roofline.

Everything is timed with wall clocks around real calls; each number is the median of `repeats`
runs after a warm-up run. `BenchReport.to_dict()` is the JSON (`SCHEMA`). HF runs in a process of
its own (`HFProcess`), as a user's script would run it: graphgen's runtime tunes the allocator of
the process it runs in (runtime/graphs.py, keep_freed_memory), and the two engines share no
threads or memory.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

SCHEMA = "graphgen.bench/1"
MIXED_REQUESTS = 64
MIXED_PROMPT_LENS = (16, 256)
MIXED_OUTPUT_LENS = (16, 128)
MIB = 1 << 20
SETTLE_SECONDS = 0.5  # between timed runs with HF in its own process (bench(): `settled`)


# --- workloads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Requests as token-id prompts with the number of tokens each must generate."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def describe(self) -> dict:
        p = [len(x) for x in self.prompts]
        return {"name": self.name, "requests": self.num_requests, "prompt_lens": [min(p), max(p)],
                "output_lens": [min(self.output_lens), max(self.output_lens)], "output_tokens": self.output_tokens}


def _token_ids(rng: random.Random, n: int, vocab_size: int, avoid: set[int]) -> list[int]:
    ids = []
    while len(ids) < n:
        t = rng.randrange(vocab_size)
        if t not in avoid:
            ids.append(t)
    return ids


def fixed_workload(batch_size: int, prompt_len: int, output_len: int, *, vocab_size: int,
                   avoid: set[int] = frozenset(), seed: int = 0) -> Workload:
    """`batch_size` different prompts of `prompt_len` ids (none in `avoid`), `output_len` tokens each."""
    if min(batch_size, prompt_len, output_len) < 1:
        raise ValueError(f"batch_size, prompt_len and output_len must be >= 1, got {batch_size}, {prompt_len}, "
                         f"{output_len}")
    rng = random.Random(seed)
    prompts = [_token_ids(rng, prompt_len, vocab_size, set(avoid)) for _ in range(batch_size)]
    return Workload(f"fixed-b{batch_size}", prompts, [output_len] * batch_size)


def mixed_workload(*, vocab_size: int, num_requests: int = MIXED_REQUESTS,
                   prompt_lens: tuple[int, int] = MIXED_PROMPT_LENS, output_lens: tuple[int, int] = MIXED_OUTPUT_LENS,
                   avoid: set[int] = frozenset(), seed: int = 0) -> Workload:
    """`num_requests` prompts with lengths uniform in prompt_lens and outputs uniform in output_lens
    (both inclusive), the same for a given seed on every machine (Python's own generator)."""
    for name, (lo, hi) in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be 1 <= low <= high, got {(lo, hi)}")
    rng = random.Random(seed)
    plens = [rng.randint(*prompt_lens) for _ in range(num_requests)]
    olens = [rng.randint(*output_lens) for _ in range(num_requests)]
    prompts = [_token_ids(rng, n, vocab_size, set(avoid)) for n in plens]
    return Workload("mixed", prompts, olens)


def fit_lengths(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Shrink the prompt first, then the output, so prompt + output fits max_model_len (the engine
    ends a sequence at max_model_len)."""
    output_len = min(output_len, max_model_len - 1)
    prompt_len = max(1, min(prompt_len, max_model_len - output_len))
    return prompt_len, output_len


def static_batches(workload: Workload, batch_size: int) -> list[tuple[list[int], int, int]]:
    """HF's static batching: consecutive groups of `batch_size` requests -> (request indices,
    padded prompt length, max_new_tokens = the group's longest output)."""
    out = []
    for start in range(0, workload.num_requests, batch_size):
        idx = list(range(start, min(start + batch_size, workload.num_requests)))
        out.append((idx, max(len(workload.prompts[i]) for i in idx), max(workload.output_lens[i] for i in idx)))
    return out


# --- timing of one run -----------------------------------------------------------------------------
@dataclass
class RunStats:
    """One workload through one engine. Times in seconds."""

    seconds: float  # first request submitted -> last token
    output_tokens: int  # tokens the workload asked for (padding work of static batches not counted)
    ttft_s: float  # mean over requests of submit -> first token
    decode_tok_s: float | None  # fixed workloads: tokens after the first / time after the last first token

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def run_stats(start: float, end: float, first: dict[int, float], last: dict[int, float], workload: Workload,
              decode: bool) -> RunStats:
    """From per-request first/last token times (perf_counter) to RunStats."""
    ttft = statistics.fmean(first[i] - start for i in range(workload.num_requests))
    rate = None
    if decode:
        after_first = workload.output_tokens - workload.num_requests
        window = max(last.values()) - max(first.values())
        rate = after_first / window if after_first and window > 0 else None
    return RunStats(end - start, workload.output_tokens, ttft, rate)


def median_stats(runs: list[RunStats]) -> RunStats:
    """Field-wise median of repeated runs."""
    rates = [r.decode_tok_s for r in runs if r.decode_tok_s is not None]
    return RunStats(statistics.median(r.seconds for r in runs), runs[0].output_tokens,
                    statistics.median(r.ttft_s for r in runs), statistics.median(rates) if rates else None)


def run_graphgen(llm, workload: Workload, *, decode: bool) -> RunStats:
    """The workload through `llm.stream` (continuous batching), every request queued at once."""
    from .runtime.params import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    got = [0] * workload.num_requests
    start = time.perf_counter()
    for event in llm.stream(workload.prompts, params):
        if event.token_id >= 0:
            now = time.perf_counter()
            first.setdefault(event.index, now)
            last[event.index] = now
            got[event.index] += 1
    end = time.perf_counter()
    short = [i for i, n in enumerate(workload.output_lens) if got[i] != n]
    if short:
        raise RuntimeError(f"graphgen produced {got[short[0]]} tokens for request {short[0]} instead of "
                           f"{workload.output_lens[short[0]]} (pool too small or max_model_len too short?)")
    return run_stats(start, end, first, last, workload, decode)


class _TokenClock:
    """An HF streamer that only notes when each put (prompt, then one per new token) happens."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model, workload: Workload, batch_size: int, pad_token_id: int, *, decode: bool) -> RunStats:
    """The workload through HF `generate` (greedy, its own KV cache) in static batches of
    `batch_size`, prompts left-padded to the batch's longest, each batch run to its longest output."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    start = time.perf_counter()
    for idx, width, new_tokens in static_batches(workload, batch_size):
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(idx), width), dtype=torch.int64)
        for row, i in enumerate(idx):
            p = workload.prompts[i]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        clock = _TokenClock()
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=pad_token_id, streamer=clock)
        if out.shape[1] - width != new_tokens or len(clock.times) != new_tokens + 1:
            raise RuntimeError(f"HF generate stopped after {out.shape[1] - width} of {new_tokens} tokens")
        for i in idx:
            first[i] = clock.times[1]
            last[i] = clock.times[workload.output_lens[i]]
    end = time.perf_counter()
    return run_stats(start, end, first, last, workload, decode)


class HFProcess:
    """HF `generate` on the artifact's checkpoint in a process of its own, asked to run workloads
    one at a time (`run`), so that HF runs as a user's script would: with glibc's default
    allocator settings, which graphgen's runtime changes for the whole process it runs in
    (keep_freed_memory: HF's generate faulted ~250K pages in per batch of 16 under the defaults and
    ran ~10-15% faster without them), with its own OpenMP threads, and beside none of graphgen's
    memory. `threads`: torch's threads there (the bench's). A fresh interpreter (`python -c`),
    not multiprocessing's spawn, which would run the caller's main script again in the child."""

    def __init__(self, artifact: Path, device: torch.device, threads: int):
        self._conn, child = multiprocessing.Pipe()
        fd = child.fileno()
        here = str(Path(__file__).resolve().parent.parent)  # this graphgen, wherever it is imported from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        code = "import sys; from graphgen.bench import _hf_process_main; _hf_process_main(*sys.argv[1:])"
        self._proc = subprocess.Popen([sys.executable, "-c", code, str(fd), str(artifact), str(device), str(threads)],
                                      pass_fds=(fd,), env=env)
        child.close()
        self.pad_token_id = self._receive()

    def run(self, workload: Workload, batch_size: int, *, decode: bool) -> RunStats:
        try:
            self._conn.send((workload, batch_size, decode))
        except OSError:  # the process is gone: _receive says so
            pass
        return self._receive()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        if self.alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._conn.close()

    def _receive(self):
        try:
            ok, value = self._conn.recv()
        except EOFError:
            code = self._proc.wait()
            self.close()
            raise RuntimeError(f"the HF process exited (exit code {code}) before answering; its own output, above, "
                               "says why") from None
        if not ok:
            self.close()
            raise RuntimeError(f"HF generate failed in its process:\n{value}")
        return value


def _hf_process_main(fd: str, artifact: str, device: str, threads: str) -> None:
    """HFProcess's child: load HF, say its pad token id, then run each (workload, batch_size,
    decode) sent until None; every answer is (ok, value or the error's traceback)."""
    from multiprocessing.connection import Connection

    from .artifact import read_manifest

    conn = Connection(int(fd))
    torch.set_num_threads(int(threads))
    try:
        model, pad = _load_hf(read_manifest(artifact), torch.device(device))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, pad))
    while (job := conn.recv()) is not None:
        workload, batch_size, decode = job
        try:
            conn.send((True, run_hf(model, workload, batch_size, pad, decode=decode)))
        except Exception:  # noqa: BLE001
            conn.send((False, traceback.format_exc()))


# --- the machine's limit ---------------------------------------------------------------------------
def read_bandwidth(nbytes: int, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Bytes/s of a streaming read (a sum) over an fp32 buffer of about `nbytes` on `device`, best
    of `repeats` after a warm-up: what the memory the artifact's weights live in delivers. The
    buffer is at least 1 MiB, and on an accelerator at least 256 MiB (its cache holds tens of MiB,
    and a small read times the kernel launch)."""
    device = torch.device(device)
    floor = MIB if device.type == "cpu" else 256 * MIB
    sync = (lambda: None) if device.type == "cpu" else getattr(torch, device.type).synchronize
    buf = torch.ones(max(nbytes, floor) // 4, dtype=torch.float32, device=device)
    buf.sum()
    sync()
    best = math.inf
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        buf.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


@dataclass
class ModelBytes:
    """What one batch-1 decode step reads, from the checkpoint's tensor shapes and the KV spec."""

    parameters: int
    weight_bytes: int  # every tensor in the artifact's dtype
    step_weight_bytes: int  # minus the input embedding table (a decode step reads one row of it)
    kv_bytes_per_token: int  # keys + values of one position, all layers (stored head_dim)

    def step_bytes(self, context_len: float) -> float:
        return self.step_weight_bytes + self.kv_bytes_per_token * context_len


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


def model_bytes(shapes: dict[str, tuple[int, ...]], elem_size: int, *, kv_bytes_per_token: int,
                tied_embeddings: bool, int8_head: str | None = None) -> ModelBytes:
    """From checkpoint tensor shapes. A tied embedding is the LM head too, so it is read whole.
    `int8_head`: the LM head tensor a greedy step reads as its int8 copy (runtime/graphs.py: Head)."""
    params = sum(math.prod(s) for s in shapes.values())
    step = params * elem_size
    if not tied_embeddings:
        for name, s in shapes.items():
            if name.endswith(EMBEDDING_SUFFIXES) and len(s) == 2:
                step -= (math.prod(s) - s[1]) * elem_size
    if int8_head is not None:
        step -= math.prod(shapes[int8_head]) * (elem_size - 1)
    return ModelBytes(params, params * elem_size, step, kv_bytes_per_token)


def artifact_model_bytes(manifest, *, greedy_head: bool = False) -> ModelBytes:
    """`greedy_head`: greedy steps take the runtime's greedy_head (LLM.runner.greedy_tokens)."""

    from safetensors import safe_open

    from .spec import DTYPES

    shapes = {}
    for path in sorted(manifest.model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    kv = manifest.kv
    elem = torch.empty((), dtype=DTYPES[manifest.data["dtype"]]).element_size()
    tied = bool(manifest.data["model_config"].get("tie_word_embeddings")) and not any(
        k.endswith("lm_head.weight") for k in shapes)
    head = manifest.graphs["decode"].get("head", {}).get("weight") if greedy_head else None
    return model_bytes(shapes, elem, kv_bytes_per_token=kv.bytes_per_block // kv.block_size, tied_embeddings=tied,
                       int8_head=head[1] if head and head[0] == "model" else None)


def roofline(bandwidth: float, step_bytes: float, decode_tok_s: float | None) -> dict:
    """Batch-1 decode tokens/s a memory-bound step could reach, and the measured fraction of it."""
    limit = bandwidth / step_bytes
    return {"bytes_per_step": int(step_bytes), "tok_s": limit,
            "fraction": None if decode_tok_s is None else decode_tok_s / limit}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, None when either is missing or theirs is 0."""
    return None if ours is None or not theirs else ours / theirs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- the report ------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    artifact: dict
    machine: dict
    settings: dict
    fixed: list[dict] = field(default_factory=list)
    mixed: dict | None = None
    roofline: dict | None = None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}


def _stats_dict(s: RunStats | None) -> dict | None:
    if s is None:
        return None
    return {"seconds": s.seconds, "output_tokens": s.output_tokens, "tokens_per_s": s.tokens_per_s,
            "ttft_s": s.ttft_s, "decode_tok_s": s.decode_tok_s}


def _pair(workload: Workload, ours: RunStats, theirs: RunStats | None, key: str) -> dict:
    return {"workload": workload.describe(), "graphgen": _stats_dict(ours), "hf": _stats_dict(theirs),
            "speedup": ratio(getattr(ours, key), getattr(theirs, key) if theirs else None)}


def bench(artifact: str | Path, *, batch_sizes: list[int] = (1, 16), workloads: tuple[str, ...] = ("fixed", "mixed"),
          vs_hf: bool = False, prompt_len: int = 128, output_len: int = 128, repeats: int = 3, seed: int = 0,
          max_num_seqs: int = 16, mixed_requests: int = MIXED_REQUESTS, step_tokens: int | None = None,
          progress: Callable[[str], None] | None = None) -> BenchReport:
    """Measure `artifact` (see the module docstring); `progress` gets a line per stage. step_tokens:
    the runtime's (`LLM`; None: its default, 0: separate prefill and decode steps)."""
    from .runtime.engine import LLM

    say = progress or (lambda line: None)
    say("loading the artifact")
    t = time.perf_counter()
    llm = LLM(artifact, step_tokens=step_tokens)
    load_seconds = time.perf_counter() - t
    m = llm.manifest
    cfg = m.data["model_config"]
    vocab = int(cfg["vocab_size"])
    special = m.special_tokens
    avoid = {i for i in [special.get("bos"), special.get("pad"), *special.get("eos", [])] if i is not None}
    sizes = artifact_model_bytes(m, greedy_head=llm.runner.greedy_tokens)  # the bench's requests are greedy
    running = llm.scheduler.max_running
    report = BenchReport(
        artifact={"name": m.data["name"], "path": str(m.root), "dtype": m.data["dtype"],
                  "parameters": sizes.parameters, "weight_bytes": sizes.weight_bytes,
                  "load_seconds": load_seconds, "max_running_seqs": running},
        machine={"threads": torch.get_num_threads(), "torch": torch.__version__, "device": llm.device.type},
        settings={"batch_sizes": list(batch_sizes), "workloads": list(workloads), "vs_hf": vs_hf,
                  "prompt_len": prompt_len, "output_len": output_len, "repeats": repeats, "seed": seed,
                  "max_num_seqs": max_num_seqs, "mixed_requests": mixed_requests,
                  "step_tokens": llm.scheduler.step_tokens or 0},
    )
    max_len = m.limits["max_model_len"]
    plen, olen = fit_lengths(prompt_len, output_len, max_len)
    if (plen, olen) != (prompt_len, output_len):
        report.skipped.append(f"fixed lengths {prompt_len}+{output_len} exceed max_model_len {max_len}; "
                              f"using {plen}+{olen}")
    # (label, workload, graphgen call, HF call or None): warmed up first, then timed interleaved.
    cases: list[tuple[str, Workload, Callable[[], RunStats], Callable | None]] = []
    if "fixed" in workloads:
        for b in batch_sizes:
            if b > running:
                report.skipped.append(f"batch {b}: this artifact decodes at most {running} sequences at once "
                                      "(its largest decode bucket); not measured")
                continue
            w = fixed_workload(b, plen, olen, vocab_size=vocab, avoid=avoid, seed=seed)
            cases.append((f"decode, batch {b}", w, lambda w=w: run_graphgen(llm, w, decode=True),
                          lambda hf, w=w: hf.run(w, w.num_requests, decode=True)))
    seqs = min(max_num_seqs, running)
    if "mixed" in workloads:
        if seqs < max_num_seqs:
            report.skipped.append(f"mixed: max_num_seqs {max_num_seqs} lowered to the {seqs} sequences this "
                                  "artifact decodes at once")
        out_hi = min(MIXED_OUTPUT_LENS[1], max_len - MIXED_PROMPT_LENS[0])
        prompt_hi = min(MIXED_PROMPT_LENS[1], max_len - out_hi)
        mw = mixed_workload(vocab_size=vocab, num_requests=mixed_requests, prompt_lens=(MIXED_PROMPT_LENS[0], prompt_hi),
                            output_lens=(MIXED_OUTPUT_LENS[0], out_hi), avoid=avoid, seed=seed)
        mllm = llm if seqs >= llm.scheduler.max_running else LLM(artifact, max_num_seqs=seqs, verify_checksums=False,
                                                                    step_tokens=step_tokens)
        cases.append((f"mixed, {mw.num_requests} requests, {seqs} at once", mw,
                      lambda: run_graphgen(mllm, mw, decode=False),
                      lambda hf: hf.run(mw, seqs, decode=False)))
    for label, _, ours, _ in cases:
        say(f"graphgen warm-up: {label}")
        ours()
    report.artifact["peak_rss_mib"] = peak_rss_mib()  # before HF is loaded

    say("read bandwidth")
    bandwidths = [read_bandwidth(sizes.step_weight_bytes, device=llm.device)]

    hf = None
    results = {}

    def settled(run, *args):
        # With HF in its own process, each engine's OpenMP threads spin for a while after its run
        # (libgomp's default wait policy) on the cores the other engine's run then starts on: a
        # pause lets them sleep first. It matters for runs of tens of ms (tiny models).
        if hf is not None:
            time.sleep(SETTLE_SECONDS)
        return run(*args)

    def sampled(run):  # graphgen's timed runs, each after a sample of the read bandwidth
        bandwidths.append(read_bandwidth(sizes.step_weight_bytes, device=llm.device))
        return settled(run)

    try:
        if vs_hf:
            say("loading HF (eager, sdpa) from the artifact's checkpoint, in a process of its own")
            hf = HFProcess(m.root, llm.device, torch.get_num_threads())
        for label, w, ours, theirs in cases:
            if hf is not None:
                say(f"HF warm-up: {label}")
                theirs(hf)
            say(f"timing {label}: {max(1, repeats)} x graphgen" + (" and HF, interleaved" if hf is not None else ""))
            runs = [(sampled(ours), settled(theirs, hf) if hf is not None else None) for _ in range(max(1, repeats))]
            results[label] = (median_stats([g for g, _ in runs]), median_stats([h for _, h in runs]) if hf else None)
    finally:
        if hf is not None:
            hf.close()
    for label, w, _, _ in cases:
        ours, theirs = results[label]
        if w.name == "mixed":
            report.mixed = {"max_num_seqs": seqs, **_pair(w, ours, theirs, "tokens_per_s")}
        else:
            report.fixed.append({"batch_size": w.num_requests, **_pair(w, ours, theirs, "decode_tok_s")})
    bandwidth = statistics.median(bandwidths)
    report.machine["read_bandwidth_gb_s"] = bandwidth / 1e9
    report.machine["read_bandwidth_samples_gb_s"] = [b / 1e9 for b in bandwidths]
    one = next((r["graphgen"]["decode_tok_s"] for r in report.fixed if r["batch_size"] == 1), None)
    report.roofline = roofline(bandwidth, sizes.step_bytes(plen + olen / 2), one)
    report.roofline["context_len"] = plen + olen / 2
    return report


def _load_hf(manifest, device: torch.device):
    """HF's model from the artifact's checkpoint, on the artifact's device (like for like)."""
    from transformers import AutoModelForCausalLM

    from .spec import DTYPES

    model = AutoModelForCausalLM.from_pretrained(
        str(manifest.model_dir), dtype=DTYPES[manifest.data["dtype"]], attn_implementation="sdpa",
        local_files_only=True).eval().to(device)
    special = manifest.special_tokens
    pad = special.get("pad")
    if pad is None:
        pad = (special.get("eos") or [0])[0]
    return model, pad


# --- output ----------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def print_report(report: BenchReport, console) -> None:
    """The rich tables: decode per batch size, the mixed workload, the machine's limit."""
    from rich.table import Table

    a = report.artifact
    console.print(f"[bold]{a['name']}[/] ({a['dtype']}, {a['parameters'] / 1e6:.1f}M parameters, "
                  f"{a['weight_bytes'] / MIB:.0f} MiB): load {a['load_seconds']:.2f} s, peak RSS "
                  f"{a['peak_rss_mib']:.0f} MiB, {report.machine['threads']} threads", highlight=False)
    if report.fixed:
        t = Table(title="decode, fixed lengths (tokens/s after the first token; TTFT in ms)")
        for col in ("batch", "prompt+output", "graphgen tok/s", "HF tok/s", "speedup", "graphgen TTFT", "HF TTFT"):
            t.add_column(col, justify="right")
        for row in report.fixed:
            w, g, h = row["workload"], row["graphgen"], row["hf"]
            t.add_row(str(row["batch_size"]), f"{w['prompt_lens'][0]}+{w['output_lens'][0]}",
                      _fmt(g["decode_tok_s"]), _fmt(h and h["decode_tok_s"]), _fmt(row["speedup"], ".2f", "x"),
                      _fmt(g["ttft_s"] * 1e3), _fmt(h and h["ttft_s"] * 1e3))
        console.print(t)
    if report.mixed:
        mx = report.mixed
        w, g, h = mx["workload"], mx["graphgen"], mx["hf"]
        t = Table(title=f"mixed workload: {w['requests']} requests, prompts {w['prompt_lens'][0]}-{w['prompt_lens'][1]}, "
                        f"outputs {w['output_lens'][0]}-{w['output_lens'][1]}, max_num_seqs {mx['max_num_seqs']}")
        for col in ("", "output tok/s", "seconds", "mean TTFT ms"):
            t.add_column(col, justify="right")
        t.add_row("graphgen", _fmt(g["tokens_per_s"]), _fmt(g["seconds"], ".2f"), _fmt(g["ttft_s"] * 1e3))
        if h:
            t.add_row("HF (static batches)", _fmt(h["tokens_per_s"]), _fmt(h["seconds"], ".2f"),
                      _fmt(h["ttft_s"] * 1e3))
            t.add_row("speedup", _fmt(mx["speedup"], ".2f", "x"), "", "")
        console.print(t)
    r = report.roofline
    where = "" if report.machine.get("device", "cpu") == "cpu" else f" ({report.machine['device']} memory)"
    samples = report.machine["read_bandwidth_samples_gb_s"]
    console.print(f"read bandwidth{where} {report.machine['read_bandwidth_gb_s']:.1f} GB/s (median of {len(samples)} "
                  f"samples, {min(samples):.1f}-{max(samples):.1f}); batch-1 step reads "
                  f"{r['bytes_per_step'] / MIB:.1f} MiB (context {r['context_len']:.0f}) -> roofline "
                  f"{r['tok_s']:.1f} tok/s; batch-1 decode at {_fmt(r['fraction'] and r['fraction'] * 100, '.0f', '%')}"
                  " of it", highlight=False)
    for line in report.skipped:
        console.print(f"[yellow]note:[/] {line}", highlight=False)




def run_bench_cli(artifact: Path, *, batch_sizes: str, workload: str, vs_hf: bool, prompt_len: int,
                  output_len: int, repeats: int, threads: int | None, as_json: bool, fail, console, out,
                  step_tokens: int | None = None) -> None:
    """`graphgen bench`: parse the options, run, print a table (or JSON on stdout)."""
    import json

    from .artifact import ArtifactError

    try:
        sizes = [int(b) for b in batch_sizes.replace(" ", "").split(",") if b]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        fail(f"--batch-sizes {batch_sizes!r}: give positive comma-separated integers, e.g. --batch-sizes 1,16")
    choices = {"fixed": ("fixed",), "mixed": ("mixed",), "all": ("fixed", "mixed")}
    if workload not in choices:
        fail(f"--workload {workload!r}: choose fixed, mixed or all")
    if min(prompt_len, output_len, repeats) < 1:
        fail("--prompt-len, --output-len and --repeats must be >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        report = bench(artifact, batch_sizes=sizes, workloads=choices[workload], vs_hf=vs_hf, prompt_len=prompt_len,
                       output_len=output_len, repeats=repeats, step_tokens=step_tokens,
                       progress=None if as_json else (lambda line: console.print(f"[dim]{line}[/]", highlight=False)))
    except (ArtifactError, ValueError, RuntimeError) as e:
        fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        print_report(report, out)


__all__ = [
    "SCHEMA", "BenchReport", "HFProcess", "ModelBytes", "RunStats", "Workload", "bench", "fit_lengths",
    "fixed_workload",
    "median_stats", "mixed_workload", "model_bytes", "print_report", "ratio", "read_bandwidth", "roofline",
    "run_bench_cli", "run_stats", "static_batches",
]
