"""Sampling across a batch, with hand-made logits and no model."""

from __future__ import annotations

import math

import torch

from chatqueue.engine.hf.sampling import SamplingBatch, SamplingRequest
from chatqueue.types import SamplingParams

CPU = torch.device("cpu")
VOCAB = 16


def make_batch(*params: SamplingParams, prompts: list[list[int]] | None = None) -> SamplingBatch:
    prompts = prompts or [[] for _ in params]
    requests = [SamplingRequest(p, ids) for p, ids in zip(params, prompts, strict=True)]
    return SamplingBatch.create(requests, vocab_size=VOCAB, device=CPU)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    batch = make_batch(
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=0.7, top_k=1),
    )
    logits = random_logits(3)
    for _ in range(5):
        tokens = batch.sample(logits).tokens
        assert tokens[0] == logits[0].argmax()
        assert tokens[2] == logits[2].argmax()


def test_top_k_keeps_exactly_k_tokens_per_row() -> None:
    batch = make_batch(SamplingParams(top_k=3), SamplingParams(top_k=5), SamplingParams())
    logits = random_logits(3)
    processed = batch.process(logits)
    kept = torch.isfinite(processed).sum(dim=-1).tolist()
    assert kept == [3, 5, VOCAB]
    expected_top3 = set(logits[0].topk(3).indices.tolist())
    assert set(torch.isfinite(processed[0]).nonzero().flatten().tolist()) == expected_top3


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4))
    logits = probs.clamp_min(1e-12).log().repeat(3, 1)
    batch = make_batch(SamplingParams(top_p=0.45), SamplingParams(top_p=0.7), SamplingParams())
    kept = torch.isfinite(batch.process(logits))
    assert kept[0, :4].tolist() == [True, False, False, False]
    assert kept[1, :4].tolist() == [True, True, False, False]
    assert kept[2, :4].tolist() == [True, True, True, True]


def test_top_p_applies_to_what_top_k_kept() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (VOCAB - 4))
    logits = probs.clamp_min(1e-12).log().unsqueeze(0)
    # Renormalised over the top 2, token 0 holds 4/7 of the mass: p = 0.5 keeps only it.
    batch = make_batch(SamplingParams(top_k=2, top_p=0.5))
    kept = torch.isfinite(batch.process(logits))[0]
    assert kept.nonzero().flatten().tolist() == [0]


def test_sampled_tokens_stay_inside_the_filter() -> None:
    batch = make_batch(SamplingParams(temperature=5.0, top_k=2))
    logits = random_logits(1)
    allowed = set(logits[0].topk(2).indices.tolist())
    drawn = {int(batch.sample(logits).tokens[0]) for _ in range(50)}
    assert drawn <= allowed
    assert len(drawn) == 2


def test_temperature_divides_logits() -> None:
    batch = make_batch(SamplingParams(temperature=2.0), SamplingParams(temperature=0.0))
    logits = random_logits(2)
    processed = batch.process(logits)
    torch.testing.assert_close(processed[0], logits[0] / 2)
    torch.testing.assert_close(processed[1], logits[1])


def test_repetition_penalty_is_multiplicative_over_prompt_and_generated_ids() -> None:
    batch = make_batch(
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.0),
        prompts=[[1, 2], [1, 2]],
    )
    logits = torch.zeros(2, VOCAB)
    logits[:, 1], logits[:, 2], logits[:, 3], logits[:, 4] = 4.0, -4.0, 1.0, 10.0
    batch.sample(logits)  # both rows generate token 4
    processed = batch.process(logits)
    assert processed[0, 1] == 2.0  # positive, seen in the prompt: divided
    assert processed[0, 2] == -8.0  # negative, seen in the prompt: multiplied
    assert processed[0, 3] == 1.0  # never seen: unchanged
    assert processed[0, 4] == 5.0  # generated: divided
    torch.testing.assert_close(processed[1], logits[1])


def test_frequency_and_presence_penalties_count_generated_ids_only() -> None:
    batch = make_batch(
        SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.0),
        prompts=[[7]],
    )
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 10.0
    batch.sample(logits)
    batch.sample(logits)  # token 3 twice
    processed = batch.process(logits)[0]
    assert math.isclose(processed[3].item(), 10.0 - 2 * 0.5 - 1.0)
    assert processed[7] == 0.0  # in the prompt only: OpenAI's penalties ignore it


def test_seeded_row_is_reproducible_whatever_its_neighbours() -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234)
    logits_row = random_logits(1, seed=5)[0]

    def draw(batch: SamplingBatch, row: int, steps: int = 30) -> list[int]:
        logits = logits_row.repeat(len(batch), 1)
        return [int(batch.sample(logits).tokens[row]) for _ in range(steps)]

    alone = draw(make_batch(seeded), row=0)
    crowded = draw(
        make_batch(
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.3, top_k=4, seed=99),
            seeded,
            SamplingParams(temperature=0.0),
        ),
        row=2,
    )
    assert alone == crowded
    other_seed = draw(make_batch(SamplingParams(temperature=1.0, seed=4321)), row=0)
    assert other_seed != alone


def test_select_and_concat_keep_each_rows_state() -> None:
    first = make_batch(
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.5, top_k=3),
        prompts=[[1], [2]],
    )
    second = make_batch(SamplingParams(temperature=0.0, frequency_penalty=1.0), prompts=[[3]])
    joined = first.select([0]).concat(second)
    assert [p.repetition_penalty for p in joined.params] == [2.0, 1.0]
    assert joined.seen[:, :4].tolist() == [[False, True, False, False], [False, False, False, True]]
    assert joined.top_k.tolist() == [VOCAB, VOCAB]
    assert joined.frequency_penalty.tolist() == [0.0, 1.0]


def test_penalty_tables_exist_only_while_a_row_has_a_penalty() -> None:
    plain = make_batch(SamplingParams(temperature=0.0), SamplingParams(temperature=0.7))
    assert plain.seen is None and plain.counts is None
    penalized = make_batch(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompts=[[3]])

    joined = plain.concat(penalized)
    assert joined.seen is not None
    assert joined.seen[:, 3].tolist() == [False, False, True]
    logits = torch.zeros(3, VOCAB)
    logits[:, 3], logits[:, 4] = 1.0, 0.9
    tokens = joined.sample(logits).tokens.tolist()
    assert (tokens[0], tokens[2]) == (3, 4)  # 3 is in row 2's prompt: 1.0 / 2 < 0.9
    assert joined.select([0, 1]).seen is None
    kept = joined.select([2, 0])
    assert kept.seen is not None
    assert kept.seen[0, 3:5].tolist() == [True, True]  # its prompt's id, then its sampled one


def test_the_row_argmax_is_torchs_for_ties_infinities_nan_and_views() -> None:
    from chatqueue.engine.hf.sampling import argmax_rows

    rows = random_logits(6, seed=3)
    rows[1, [2, 9, 11]] = 50.0  # a tie: the first index wins
    rows[2] = float("-inf")
    rows[2, 7] = 0.0
    rows[3] = float("-inf")  # every token masked away
    rows[4, 5] = float("nan")
    rows[5, [4, 8]] = float("inf")
    with torch.inference_mode():
        frozen = rows.clone()
    for values in (rows, rows[:, :12], rows.t().contiguous().t(), frozen, rows.double()):
        got = argmax_rows(values)
        assert got.dtype == torch.int64
        assert got.tolist() == values.argmax(dim=-1).tolist()
