"""Logprobs from the batched sampler, checked against torch.log_softmax directly (fp32)."""

from __future__ import annotations

import torch

from chatqueue.engine.hf.sampling import MIN_LOGPROB, SamplingBatch, SamplingRequest, step_output
from chatqueue.types import SamplingParams

CPU = torch.device("cpu")
VOCAB = 32


def make_batch(*params: SamplingParams) -> SamplingBatch:
    requests = [SamplingRequest(p, [1, 2]) for p in params]
    return SamplingBatch.create(requests, vocab_size=VOCAB, device=CPU)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_a_batch_where_no_row_asks_computes_no_logprobs() -> None:
    batch = make_batch(SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1))
    sampled = batch.sample(random_logits(2))
    assert sampled.logprobs is None
    assert step_output([([7, 8], sampled)]).logprobs == {}


def test_greedy_rows_report_the_models_own_logprobs() -> None:
    logits = random_logits(3)
    batch = make_batch(
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0),
    )
    sampled = batch.sample(logits)
    assert sampled.logprobs is not None  # computed over the two rows that asked, not three
    assert sampled.logprobs.rows == [0, 2] and sampled.logprobs.chosen.shape == (2,)
    output = step_output([([10, 11, 12], sampled)])
    expected = torch.log_softmax(logits, dim=-1)
    assert set(output.logprobs) == {10, 12}  # the row that did not ask has none
    for rid, row in ((10, 0), (12, 2)):
        lp = output.logprobs[rid]
        token = output.tokens[rid]
        assert token == int(expected[row].argmax())
        assert abs(lp.logprob - float(expected[row, token])) < 1e-5
    first = output.logprobs[10]
    top_values, top_ids = expected[0].topk(5)
    assert first.top_ids == tuple(top_ids.tolist())
    assert torch.allclose(torch.tensor(first.top_logprobs), top_values, atol=1e-5)
    assert first.top_ids[0] == output.tokens[10]
    assert output.logprobs[12].top_ids == ()


def test_sampled_rows_report_the_logprob_after_temperature_of_the_token_drawn() -> None:
    logits = random_logits(2, seed=3)
    batch = make_batch(
        SamplingParams(temperature=0.5, seed=7, logprobs=3),
        SamplingParams(temperature=1.7, seed=8, logprobs=20),
    )
    output = step_output([([0, 1], batch.sample(logits))])
    for row, temperature in ((0, 0.5), (1, 1.7)):
        expected = torch.log_softmax(logits[row] / temperature, dim=-1)
        lp = output.logprobs[row]
        assert abs(lp.logprob - float(expected[output.tokens[row]])) < 1e-5
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        assert all(v <= 0 for v in lp.top_logprobs)
        assert torch.allclose(
            torch.tensor(lp.top_logprobs), expected.topk(len(lp.top_ids)).values, atol=1e-5
        )
    assert len(output.logprobs[1].top_ids) == 20


def test_top_k_renormalizes_and_what_it_removed_reports_openais_floor() -> None:
    logits = random_logits(1, seed=5)
    batch = make_batch(SamplingParams(temperature=1.0, top_k=2, seed=1, logprobs=4))
    output = step_output([([0], batch.sample(logits))])
    kept = logits[0].topk(2).values
    expected = torch.log_softmax(kept, dim=-1)
    lp = output.logprobs[0]
    assert torch.allclose(torch.tensor(lp.top_logprobs[:2]), expected, atol=1e-5)
    assert lp.top_logprobs[2:] == (MIN_LOGPROB, MIN_LOGPROB)
    assert output.tokens[0] in lp.top_ids[:2]


def test_logprobs_with_penalties_follow_the_penalized_logits() -> None:
    logits = random_logits(1, seed=9)
    batch = make_batch(SamplingParams(temperature=0.0, presence_penalty=1.5, logprobs=1))
    processed = batch.process(logits)
    output = step_output([([0], batch.sample(logits))])
    expected = torch.log_softmax(processed[0], dim=-1)
    assert abs(output.logprobs[0].logprob - float(expected.max())) < 1e-5


def test_logprobs_survive_rows_joining_and_leaving() -> None:
    a = make_batch(SamplingParams(temperature=0.0))
    b = make_batch(SamplingParams(temperature=0.0, logprobs=2))
    joined = a.concat(b)
    logits = random_logits(2, seed=11)
    output = step_output([([5, 6], joined.sample(logits))])
    assert set(output.logprobs) == {6}
    expected = torch.log_softmax(logits[1], dim=-1)
    assert abs(output.logprobs[6].logprob - float(expected.max())) < 1e-5
    alone = joined.select([1])
    output = step_output([([6], alone.sample(logits[1:]))])
    assert set(output.logprobs) == {6}
