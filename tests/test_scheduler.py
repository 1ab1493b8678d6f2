import random

import pytest

from graphgen.runtime.block_manager import BlockManager
from graphgen.runtime.params import SamplingParams
from graphgen.runtime.scheduler import Scheduler
from graphgen.runtime.sequence import Sequence

VOCAB, EOS = 50, 0


class FakePagedModel:
    """A 'model' whose KV cache holds token ids: it writes the step's new tokens into their slots,
    then each sequence reads its context back through the block table (as the graphs do: every
    write of a step before any read). The next token is a deterministic function of what it read,
    so a wrong block table, a bad prefix hit, a chunk over a missing prefix or a lost block after
    preemption changes the outputs."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.kv = [None] * (bm.num_blocks * bm.block_size)

    def step(self, batch):
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens):
            assert self.bm.scratch_block not in seq.block_table
            assert n >= 1 and start + n <= len(seq)
            for pos in range(start, start + n):
                self.kv[self.bm.slot(seq, pos)] = seq.token_ids[pos]
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens):
            for pos in range(start):  # prefix-cache hits and earlier chunks must hold our tokens
                assert self.kv[self.bm.slot(seq, pos)] == seq.token_ids[pos]
        out = []
        for seq in batch.sampling:
            context = [self.kv[self.bm.slot(seq, p)] for p in range(len(seq))]
            out.append(1 + (sum((i + 1) * t for i, t in enumerate(context)) * 7 + len(context)) % (VOCAB - 1))
        return out


def run(sched, seqs, on_step=None, max_steps=10_000):
    model = FakePagedModel(sched.block_manager)
    for seq in seqs:
        sched.add(seq)
    for _ in range(max_steps):
        if sched.is_finished():
            break
        batch = sched.schedule()
        if on_step:
            on_step(batch)
        sampling = batch.sampling
        sched.postprocess(sampling, model.step(batch))
    assert sched.is_finished(), "scheduler did not drain"
    sched.block_manager.check_all_free()
    return {s.request_id: s.completion_token_ids for s in seqs}


def make_seqs(lengths, max_tokens=6, seed=0, **params):
    rng = random.Random(seed)
    return [Sequence([rng.randrange(1, VOCAB) for _ in range(n)], SamplingParams(max_tokens=max_tokens, **params),
                     request_id=f"r{i}") for i, n in enumerate(lengths)]


def make_sched(policy="separate", num_blocks=64, block_size=4, **kw):
    """policy "mixed": step_tokens a few past max_num_seqs, so prompts get chunked."""
    kw = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 64, "eos_token_id": EOS} | kw
    if policy == "mixed":
        step = min(kw["max_num_batched_tokens"], kw["max_num_seqs"] + 3)
        kw["step_tokens"] = step if step > kw["max_num_seqs"] else None
    return Scheduler(BlockManager(num_blocks, block_size), **kw)


@pytest.fixture(params=["separate", "mixed"])
def policy(request):
    return request.param


def test_batching_limits_respected(policy):
    sched = make_sched(policy, max_num_seqs=3, max_num_batched_tokens=20)
    seen = {"prefill": 0, "decode": 0, "mixed": 0}

    def check(batch):
        assert 1 <= len(batch) <= 3 and len(sched.running) <= 3
        seen[batch.kind] += 1
        assert sum(batch.num_tokens) <= (sched.step_tokens if batch.decode_rows and batch.kind == "mixed" else 20)
        assert all(len(s.block_table) * 4 >= start + n for s, start, n in zip(batch.seqs, batch.starts, batch.num_tokens))
        if batch.kind == "decode":
            assert batch.num_tokens == [1] * len(batch)

    out = run(sched, make_seqs([3, 9, 5, 12, 7, 4, 8, 6]), check)
    assert all(len(v) == 6 for v in out.values())
    assert seen["prefill"] >= 1 and seen["decode"] > 0
    if policy == "mixed":
        assert seen["mixed"] > 0
    else:
        assert seen["prefill"] >= 3  # 8 prompts cannot all go in one prefill


def test_both_policies_compute_the_same_tokens():
    def seqs():
        out = make_seqs([3, 9, 5, 12, 7, 4, 8, 6, 15, 2])
        for i, s in enumerate(out):  # staggered ends: prompts arrive while others decode
            s.sampling_params = SamplingParams(max_tokens=3 + 2 * i % 7)
        return out

    separate = run(make_sched("separate", max_num_seqs=4), seqs())
    for step_tokens in (5, 6, 9, 30):
        chunked, mixed = [], []

        def check(b):
            chunked.extend(n for s, st, n in zip(b.seqs, b.starts, b.num_tokens) if st + n < len(s))
            mixed.append(b.kind == "mixed")

        assert run(make_sched("separate", max_num_seqs=4, step_tokens=step_tokens), seqs(), check) == separate
        assert any(mixed) and (chunked or step_tokens == 30)  # small budgets split prompts


def test_mixed_steps_decode_every_running_sequence_and_chunk_prompts_into_the_rest():
    sched = make_sched(max_num_seqs=2, step_tokens=5)
    a, b = make_seqs([3, 10], max_tokens=4)
    sched.add(a)
    first = sched.schedule()  # nothing decodes yet: a whole prompt, the packed prefill
    assert first.kind == "prefill" and first.seqs == [a] and first.num_tokens == [3]
    sched.postprocess(first.sampling, [11])
    sched.add(b)
    step = sched.schedule()  # a's decode row, then 4 of b's 10 prompt tokens
    assert step.kind == "mixed" and step.seqs == [a, b] and step.starts == [3, 0] and step.num_tokens == [1, 4]
    assert step.sampling == [a]
    sched.postprocess(step.sampling, [12])
    step = sched.schedule()
    assert step.seqs == [a, b] and step.starts == [4, 4] and step.num_tokens == [1, 4]
    sched.postprocess(step.sampling, [13])
    step = sched.schedule()  # b's last 2 tokens complete its prompt: it samples too
    assert step.starts == [5, 8] and step.num_tokens == [1, 2] and step.sampling == [a, b]
    sched.postprocess(step.sampling, [14, 21])
    step = sched.schedule()
    assert step.kind == "decode" and step.seqs == [b] and step.num_tokens == [1]  # a reached max_tokens
    assert a.finish_reason == "length"


def test_preemption_of_newest_and_same_outputs(policy):
    lengths = [3, 2, 3, 2, 3]
    reference = run(make_sched(), make_seqs(lengths, max_tokens=12))
    sched = make_sched(policy, num_blocks=13, block_size=2)  # 12 usable blocks; each sequence grows to 7
    admitted, victims = {}, []
    step = [0]
    preempt = sched.preempt

    def spy(seq):
        victims.append((step[0], seq))
        preempt(seq)

    sched.preempt = spy

    def check(batch):
        step[0] += 1
        for i, (s, start) in enumerate(zip(batch.seqs, batch.starts)):
            if start == s.num_cached_tokens:  # (re)admitted in this step
                admitted[s.request_id] = (step[0], i)
        for when, victim in victims:
            if when == step[0] - 1:  # preempted while building this batch: newer than all who stayed
                assert all(admitted[s.request_id] <= admitted[victim.request_id] for s in batch.seqs
                           if s.request_id in admitted and s is not victim)

    out = run(sched, make_seqs(lengths, max_tokens=12), check)
    assert len(victims) >= 3, "the pool was meant to be too small"
    assert out == reference


def test_impossible_requests_fail_alone_with_clear_errors(policy):
    sched = make_sched(policy, num_blocks=6, block_size=4, max_model_len=32, max_num_batched_tokens=24)
    seqs = make_seqs([4, 40, 6, 30, 21, 5])  # 40 > max_model_len, 30 > batched tokens, 21 > 5 blocks
    out = run(sched, seqs)
    by_id = {s.request_id: s for s in seqs}
    assert by_id["r1"].finish_reason == "abort" and "max_model_len is 32" in by_id["r1"].error
    assert "max_num_batched_tokens is 24" in by_id["r3"].error and "raise" in by_id["r3"].error
    assert "pool has 5" in by_id["r4"].error and "num_blocks" in by_id["r4"].error
    for rid in ("r0", "r2", "r5"):
        assert by_id[rid].finish_reason == "length" and by_id[rid].error is None and len(out[rid]) == 6
    assert {s.request_id for s in sched.pop_finished()} == set(by_id)


def test_sequence_that_outgrows_the_whole_pool_fails_alone(policy):
    sched = make_sched(policy, num_blocks=4, block_size=2)  # 3 usable blocks: 6 tokens of KV at most
    big, small = make_seqs([3, 2], max_tokens=20)
    small.sampling_params = SamplingParams(max_tokens=1)
    run(sched, [big, small])
    assert small.finish_reason == "length"
    assert big.finish_reason == "abort" and "whole pool" in big.error and big.num_completion_tokens >= 3


def test_decode_buckets_and_padding_row():
    sched = make_sched(max_num_seqs=8, decode_batch_sizes=[1, 2, 4], require_padding_row=True)
    assert sched.max_running == 3
    assert [sched.decode_bucket(n) for n in (1, 2, 3)] == [2, 4, 4]

    def check(batch):
        assert len(batch) <= 3
        if batch.kind == "decode":
            assert sched.decode_bucket(len(batch)) > len(batch)

    run(sched, make_seqs([3, 4, 5, 6, 7]), check)
    plain = make_sched(max_num_seqs=8, decode_batch_sizes=[1, 2, 4])
    assert plain.max_running == 4 and plain.decode_bucket(3) == 4 and plain.decode_bucket(1) == 1
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        plain.decode_bucket(5)
    with pytest.raises(ValueError, match="decode bucket of at least 2"):
        make_sched(decode_batch_sizes=[1], require_padding_row=True)


def test_finish_reasons():
    sched = make_sched(max_model_len=12)
    seqs = make_seqs([4, 4, 4, 10], max_tokens=5)
    seqs[0].sampling_params = SamplingParams(max_tokens=5, stop_token_ids=[7])
    seqs[1].sampling_params = SamplingParams(max_tokens=5, ignore_eos=True)
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.kind == "prefill" and batch.seqs == seqs == batch.sampling
    sched.postprocess(batch.sampling, [7, EOS, EOS, 3])
    assert seqs[0].finish_reason == "stop" and seqs[2].finish_reason == "stop"
    assert seqs[1].finish_reason is None  # EOS ignored
    batch = sched.schedule()
    assert batch.kind == "decode" and batch.seqs == [seqs[1], seqs[3]] and batch.num_tokens == [1, 1]
    sched.postprocess(batch.sampling, [3, 3])
    assert seqs[3].finish_reason == "length" and len(seqs[3]) == 12  # max_model_len
    assert sched.abort("r1") and seqs[1].finish_reason == "abort" and not sched.abort("r1")
    assert sched.is_finished() and len(sched.pop_finished()) == 4 and sched.pop_finished() == []
    sched.block_manager.check_all_free()


def test_prefix_caching_reuses_blocks_without_changing_outputs(policy):
    prefix = list(range(1, 13))
    seqs = lambda: [Sequence(prefix + [20 + i, 30 + i], SamplingParams(max_tokens=5), request_id=f"r{i}")
                    for i in range(4)]
    sched = make_sched(policy)
    out = run(sched, seqs())
    assert sched.block_manager.stats.hit_blocks >= 3 * 3
    off = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), max_num_seqs=8,
                    max_num_batched_tokens=64, max_model_len=64, eos_token_id=EOS)
    assert run(off, seqs()) == out and off.block_manager.stats.hit_blocks == 0


def test_random_workloads_drain_and_free_everything(policy):
    """And whatever the policy, chunking and preemption, a request that completes has the tokens
    the plain policy gives it."""
    rng = random.Random(1)
    for trial in range(20):
        bs = rng.choice([1, 2, 4])
        config = dict(num_blocks=rng.randrange(6, 24), block_size=bs, max_num_seqs=rng.randrange(1, 6),
                      max_num_batched_tokens=rng.randrange(8, 40), max_model_len=32)
        lengths = [rng.randrange(1, 20) for _ in range(rng.randrange(1, 9))]
        max_tokens = rng.randrange(1, 12)
        seqs = make_seqs(lengths, max_tokens=max_tokens, seed=trial)
        out = run(make_sched(policy, **config), seqs)
        assert all(s.is_finished and s.block_table == [] for s in seqs)
        plain = make_seqs(lengths, max_tokens=max_tokens, seed=trial)
        reference = run(make_sched("separate", **config), plain)
        for a, b in zip(seqs, plain):
            if a.finish_reason != "abort" and b.finish_reason != "abort":
                assert out[a.request_id] == reference[b.request_id]
