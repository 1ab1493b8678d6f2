"""`LLM`: load an artifact and serve it, vLLM-style: `LLM(dir).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..artifact import ArtifactError, Manifest, read_manifest
from .block_manager import BlockManager, blocks_for_memory
from .params import RequestOutput, SamplingParams
from .runner import ModelRunner
from .sampler import Sampler, stop_string_hit
from .scheduler import Batch, Scheduler
from .sequence import Sequence
from .tokenizer import Detokenizer, load_tokenizer

Prompt = str | list[int]
# Tokens per step while sequences decode (decode rows included): a step of 16 decode rows and 48
# prompt tokens costs 25-60 ms less than a decode step plus the same prompt tokens alone
# (bench-125m), and 24-48 or 96-2048 were no better than 64 on the mixed workload here, with
# graphgen's CPU linear (csrc/gemv_linear.cpp) in its dot-product blocks and in its panels since
# (docs/performance.md).
DEFAULT_STEP_TOKENS = 64


@dataclass
class StreamEvent:
    """One step of one request: the token it produced and the text it added (`text` so far)."""

    index: int  # position of the request in the prompts given to `stream` (-1 from `step`)
    request_id: str
    token_id: int  # -1 on the final event
    text_delta: str
    finished: bool
    output: RequestOutput | None = None  # set on the last event of the request


@dataclass
class Stats:
    """Work done by `generate`/`stream` since the LLM was created, per kind of step. A mixed step
    computes prompt chunks and decode rows together: its tokens and time are its own."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    mixed_prefill_tokens: int = 0
    mixed_decode_tokens: int = 0
    mixed_seconds: float = 0.0
    prefix_cache_hit_blocks: int = 0
    preemptions: int = 0
    steps: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0, "mixed": 0})

    def to_dict(self) -> dict:
        rate = lambda n, s: round(n / s, 2) if s > 0 else None  # noqa: E731
        mixed = self.mixed_prefill_tokens + self.mixed_decode_tokens
        return {
            "prefill_tokens": self.prefill_tokens, "prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_seconds),
            "decode_tokens": self.decode_tokens, "decode_tokens_per_s": rate(self.decode_tokens, self.decode_seconds),
            "mixed_prefill_tokens": self.mixed_prefill_tokens, "mixed_decode_tokens": self.mixed_decode_tokens,
            "mixed_tokens_per_s": rate(mixed, self.mixed_seconds),
            "prefix_cache_hit_blocks": self.prefix_cache_hit_blocks, "steps": dict(self.steps),
        }


def _check_versions(manifest) -> None:
    built = manifest.data.get("versions", {}).get("torch")
    if manifest.data["graphs"] and any(g["format"] == "aoti" for g in manifest.graphs.values()) and built != torch.__version__:
        raise ArtifactError(
            f"{manifest.root}: compiled with torch {built}, this process runs torch {torch.__version__}; AOTInductor "
            f"graphs do not carry across torch versions: rebuild with `graphgen compile <recipe> --force`"
        )


class LLM:
    """A compiled artifact, ready to serve.

    num_blocks / kv_cache_memory size the KV pool (blocks of the manifest's block_size; bytes);
    default: room for max_num_seqs sequences of max_model_len tokens. max_num_seqs may lower the
    artifact's limit, never raise it (the decode graph was compiled for it).

    step_tokens: how many tokens a step computes while sequences are decoding, their decode rows
    included: prompts ride beside the decode rows in chunks (the mixed graph of cpu/cuda
    artifacts; Scheduler). Default DEFAULT_STEP_TOKENS, within (max_num_seqs,
    max_num_batched_tokens]; 0 runs prefills and decodes as separate steps, as artifacts without a
    mixed graph (npu) always do.
    """

    def __init__(self, artifact_dir: str | Path, *, num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_num_seqs: int | None = None, enable_prefix_caching: bool = True, verify_checksums: bool = True,
                 step_tokens: int | None = None):
        t0 = time.perf_counter()
        # The weights' checksums run in a thread while the weights are read (both release the GIL).
        self.manifest = manifest = read_manifest(artifact_dir, verify=verify_checksums, weights_later=True)
        try:
            self._load(manifest, num_blocks, kv_cache_memory, max_num_seqs, enable_prefix_caching, step_tokens)
        except Exception:
            manifest.wait_verified()  # a corrupt weights file explains a failed load better than what broke
            raise
        manifest.wait_verified()
        self.load_seconds = time.perf_counter() - t0

    def _load(self, manifest: Manifest, num_blocks: int | None, kv_cache_memory: int | None, max_num_seqs: int | None,
              enable_prefix_caching: bool, step_tokens: int | None) -> None:
        _check_versions(manifest)
        if manifest.data.get("device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise ArtifactError(f"{manifest.root}: built for cuda but this machine has no CUDA device; "
                                "compile the recipe with --target cpu")
        if manifest.data.get("device") == "npu":
            from ..backends.torchair import import_torchair

            import_torchair()  # torch.device("npu") exists only once torch_npu is imported (before torchair)
        self.device = torch.device(manifest.data.get("device", "cpu"))
        spec, limits = manifest.kv, manifest.limits
        limit = limits["max_num_seqs"]
        if max_num_seqs is not None and not 1 <= max_num_seqs <= limit:
            raise ValueError(f"max_num_seqs={max_num_seqs}: this artifact was compiled for 1..{limit} sequences")
        self.max_num_seqs = max_num_seqs or limit
        if num_blocks is None:
            if kv_cache_memory is not None:
                num_blocks = blocks_for_memory(kv_cache_memory, spec.bytes_per_block)
            else:
                num_blocks = self.max_num_seqs * spec.max_blocks_per_seq + 1  # + the scratch block
        self.block_manager = BlockManager(num_blocks, spec.block_size, enable_prefix_caching=enable_prefix_caching)
        if "mixed" not in manifest.graphs:
            if step_tokens:
                raise ValueError(f"step_tokens={step_tokens}: {manifest.root} has no mixed graph (built for "
                                 f"{manifest.data.get('device')}), so prefills and decodes run as separate steps; "
                                 "leave step_tokens unset or pass 0")
            step_tokens = 0
        elif step_tokens is None:
            step_tokens = min(max(DEFAULT_STEP_TOKENS, 2 * self.max_num_seqs), limits["max_num_batched_tokens"])
            if step_tokens <= self.max_num_seqs:  # no room for prompt tokens beside the decode rows
                step_tokens = 0
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=self.max_num_seqs, max_num_batched_tokens=limits["max_num_batched_tokens"],
            max_model_len=limits["max_model_len"], eos_token_id=manifest.special_tokens["eos"],
            # No padding row in the graph's batch: the runner keeps the advance step's extra row
            # past the rows the decode graph reads.
            decode_batch_sizes=manifest.graphs["decode"]["batch_sizes"], step_tokens=step_tokens or None,
        )
        self.runner = ModelRunner(manifest, self.block_manager, self.device)
        self.sampler = Sampler()
        self.tokenizer = load_tokenizer(manifest.model_dir)
        self.stats = Stats()
        self._detok: dict[int, Detokenizer] = {}
        self._unfinished: set[str] = set()

    # --- public API ------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of `prompts`."""
        outputs: dict[int, RequestOutput] = {}
        for event in self.stream(prompts, sampling_params):
            if event.output is not None:
                outputs[event.index] = event.output
        return [outputs[i] for i in sorted(outputs)]

    def stream(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[StreamEvent]:
        """Yield each request's tokens as they are produced (continuous batching across all);
        `event.index` is the request's position in `prompts`."""
        prompts = self._as_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        index = {self.add_request(prompt, p): i for i, (prompt, p) in enumerate(zip(prompts, params))}
        while self.has_unfinished_requests():
            for event in self.step():
                event.index = index[event.request_id]
                yield event

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> str:
        """Queue one request (text or token ids); it joins the running batch at the next `step`."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        seq = Sequence(ids, sampling_params or SamplingParams(), prompt=prompt if isinstance(prompt, str) else None)
        self._detok[seq.seq_id] = Detokenizer(self.tokenizer)
        self._unfinished.add(seq.request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def step(self) -> list[StreamEvent]:
        """One scheduler step (a prefill, a decode of the running batch, or a mixed step): the
        tokens it produced, then a final event (with `output`) for every request that ended."""
        events = []
        batch = self.scheduler.schedule()
        if batch:
            seqs = batch.sampling
            tokens = self._step(batch, seqs).tolist()
            self.scheduler.postprocess(seqs, tokens)
            for seq, token in zip(seqs, tokens):
                events.append(StreamEvent(-1, seq.request_id, token, self._text_delta(seq, token), seq.is_finished))
        for seq in self.scheduler.pop_finished():
            d = self._detok.pop(seq.seq_id, None)
            self._unfinished.discard(seq.request_id)
            events.append(StreamEvent(-1, seq.request_id, -1, "", True, output=seq.output(text=d.text if d else "")))
        self.stats.prefix_cache_hit_blocks = self.block_manager.stats.hit_blocks
        return events

    # --- internals -------------------------------------------------------------------------------
    def _as_list(self, prompts) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def _text_delta(self, seq: Sequence, token: int) -> str:
        """Detokenize the new token; end the request when a stop string appears (text cut there)."""
        d = self._detok[seq.seq_id]
        delta = d.push(token)
        stops = seq.sampling_params.stop
        if stops and not seq.is_finished:
            cut = stop_string_hit(d.text, stops, d.checked)
            d.checked = len(d.text)
            if cut is not None:
                delta = delta[: max(0, len(delta) - (len(d.text) - cut))]
                d.truncate(cut)
                self.scheduler.finish(seq, "stop")
        return delta

    def _step(self, batch: Batch, sampling: list[Sequence]) -> torch.Tensor:
        """Run the batch's graph; the tokens sampled for `sampling` (`batch.sampling`), in its order."""
        start, seqs, stats = time.perf_counter(), batch.seqs, self.stats
        # Greedy steps take each row's argmax from the runner, which finds it without every logit
        # (graphgen::greedy_head), where the sampler's greedy pick is that argmax (Sampler's is).
        greedy = (self.runner.greedy_tokens and getattr(self.sampler, "greedy_is_argmax", False)
                  and all(s.sampling_params.greedy for s in (sampling if batch.kind == "mixed" else seqs)))
        pick = (lambda out, rows: out) if greedy else self.sampler  # noqa: E731
        if batch.kind == "prefill":
            out = self.runner.prefill(seqs, greedy=greedy)
            self.runner.forget_decode_batch()
            tokens = pick(out, seqs)
            stats.prefill_tokens += sum(batch.num_tokens)
            stats.prefill_seconds += time.perf_counter() - start
        elif batch.kind == "decode":
            bucket = self.scheduler.decode_bucket(len(seqs))
            out = self.runner.decode(seqs, bucket, greedy=greedy)
            tokens = pick(out, seqs)
            self.runner.advance(seqs, tokens, bucket)
            stats.decode_tokens += len(seqs)
            stats.decode_seconds += time.perf_counter() - start
        else:
            out = self.runner.mixed(list(zip(seqs, batch.starts, batch.num_tokens)), greedy=greedy)
            self.runner.forget_decode_batch()
            tokens = pick(out, sampling) if sampling else torch.empty(0, dtype=torch.int64)
            stats.mixed_decode_tokens += batch.decode_rows
            stats.mixed_prefill_tokens += sum(batch.num_tokens) - batch.decode_rows
            stats.mixed_seconds += time.perf_counter() - start
        stats.steps[batch.kind] += 1
        return tokens
