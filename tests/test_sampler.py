import pytest
import torch

from graphgen.runtime.params import RequestOutput, SamplingParams
from graphgen.runtime.sampler import (ARGMAX_CHUNK, ARGMAX_CHUNKED_FROM, Sampler, chunked_argmax, first_argmax,
                                      nucleus_probs, stop_string_hit)
from graphgen.runtime.sequence import Sequence

V = 64


def seqs_with(*params):
    return [Sequence([1, 2, 3], p) for p in params]


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.randn(5, V)
    logits[2, 7] = logits[2, 40] = logits[2].max() + 1
    tokens = Sampler()(logits, seqs_with(*[SamplingParams()] * 5))
    assert tokens.dtype == torch.int64 and tokens.tolist() == logits.argmax(-1).tolist()
    assert tokens[2].item() == 7


@pytest.mark.parametrize("vocab", [2 * ARGMAX_CHUNK, 2 * ARGMAX_CHUNK + 1, 32000, 32001, 50257])
def test_chunked_argmax_is_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=g) for _ in range(3)]
    rows.append(torch.randint(0, 3, (vocab,), generator=g).float())  # ties everywhere
    rows.append(torch.zeros(vocab))
    rows.append(torch.full((vocab,), float("-inf")))
    for i in (0, 1, vocab // 3, vocab - 1):  # the maximum at chunk edges and in the last, short chunk
        r = torch.randn(vocab, generator=g)
        r[i] = r[-1 - i // 2] = 10.0  # tied with one later (or the same) element
        rows.append(r)
    r = torch.randn(vocab, generator=g)
    r[vocab // 2] = r[vocab // 5] = float("nan")  # argmax takes the first NaN
    rows.append(r)
    r = torch.randn(vocab, generator=g)
    r[vocab - 2] = r[7] = float("inf")
    rows.append(r)
    x = torch.stack(rows)
    assert torch.equal(chunked_argmax(x), x.argmax(dim=-1))
    for i in range(len(rows)):  # and one row at a time
        assert torch.equal(chunked_argmax(x[i:i + 1]), x[i:i + 1].argmax(dim=-1))


@pytest.mark.parametrize("shape", [(1, 300), (16, 32000), (1, 32000), (3, 2 * ARGMAX_CHUNK - 1)])
def test_first_argmax_is_argmax_chunked_or_not(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    x[:, shape[1] // 2] = x[:, -1] = 9.0  # a tie: the lower id
    assert torch.equal(first_argmax(x), x.argmax(dim=-1))
    assert (x.numel() >= ARGMAX_CHUNKED_FROM) == (shape == (16, 32000))  # the sizes cover both paths


def test_padding_rows_are_ignored():
    logits = torch.randn(4, V)
    assert Sampler()(logits, seqs_with(SamplingParams(), SamplingParams())).shape == (2,)
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(logits[:1], seqs_with(SamplingParams(), SamplingParams()))


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, V)
    logits[0, 3] = logits[0, 9] = logits[0].max() + 1  # a tie: top_k=1 must pick 3 like argmax
    sampled = Sampler()(logits, seqs_with(*[SamplingParams(temperature=1.5, top_k=1)] * 8))
    assert sampled.tolist() == logits.argmax(-1).tolist()


def test_seeds_reproduce_and_differ():
    logits = torch.randn(1, V)
    a = Sequence([1], SamplingParams(temperature=1.0, seed=7))
    b = Sequence([1], SamplingParams(temperature=1.0, seed=7))
    c = Sequence([1], SamplingParams(temperature=1.0, seed=8))
    sampler = Sampler()
    run = lambda s: [sampler(logits, [s]).item() for _ in range(20)]
    ra, rb, rc = run(a), run(b), run(c)
    assert ra == rb and ra != rc and len(set(ra)) > 1  # same seed, same stream; the stream moves
    assert ra[0] == Sampler()(logits, [Sequence([1], SamplingParams(temperature=1.0, seed=7))]).item()


def test_seeded_request_same_alone_or_in_a_batch():
    torch.manual_seed(1)
    steps = [torch.randn(6, V) for _ in range(10)]
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=123)
    alone, in_batch = Sequence([1], p), Sequence([1], p)
    others = [Sequence([1], SamplingParams(temperature=1.0)), Sequence([1], SamplingParams()),
              Sequence([1], SamplingParams(temperature=2.0, seed=5, top_p=0.5))]
    sampler = Sampler()
    got_alone = [sampler(logits[3:4], [alone]).item() for logits in steps]
    got_batch = []
    for logits in steps:  # the request sits at row 3 with different neighbours around it
        batch = others[:2] + [others[2]] + [in_batch]
        got_batch.append(sampler(logits[:4], batch)[3].item())
    assert got_alone == got_batch and len(set(got_alone)) > 1


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p, k=0: (nucleus_probs(logits, torch.tensor([k]), torch.tensor([p])) > 0)[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert kept(0.01) == [True, False, False, False]  # at least one token
    assert kept(0.99, k=2) == [True, True, False, False]  # top_k first
    # sampling never leaves the nucleus
    seqs = seqs_with(*[SamplingParams(temperature=1.0, top_p=0.6)] * 200)
    drawn = Sampler()(logits.repeat(200, 1), seqs)
    assert set(drawn.tolist()) == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 4000
    drawn = Sampler()(probs.log().repeat(n, 1), seqs_with(*[SamplingParams(temperature=1.0)] * n))
    freq = torch.bincount(drawn, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.03)


def test_temperature_to_zero_becomes_greedy():
    logits = torch.randn(16, V)
    cold = Sampler()(logits, seqs_with(*[SamplingParams(temperature=1e-4, seed=i) for i in range(16)]))
    assert cold.tolist() == logits.argmax(-1).tolist()
    hot = Sampler()(logits, seqs_with(*[SamplingParams(temperature=5.0, seed=i) for i in range(16)]))
    assert hot.tolist() != logits.argmax(-1).tolist()


def test_stop_string_hit():
    assert stop_string_hit("hello world", ("wor", "lo")) == 3
    assert stop_string_hit("hello world", ("xyz",)) is None
    assert stop_string_hit("abcSTOP", ["STOP"], start=5) == 3  # straddles the old/new text boundary
    assert stop_string_hit("STOPabc", ["STOP"], start=5) is None  # wholly in already-checked text


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"temperature": float("nan")}, "temperature"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalize_and_output():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[5])
    assert p.top_k == 0 and p.stop == ("###",) and p.stop_token_ids == (5,) and p.greedy
    seq = Sequence([1, 2], p, request_id="a", prompt="hi")
    seq.append_token(9)
    out = seq.output("x")
    assert out == RequestOutput("a", "hi", [1, 2], [9], "x", None, None) and not out.finished
