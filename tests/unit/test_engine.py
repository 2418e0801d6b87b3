"""Continuous batching: per-request results independent of batch company, aborts, admission."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minigpt5 import decode_graphs
from minigpt5 import engine as engine_module
from minigpt5.engine import AdmissionError, DecodeEngine, Finished, VokenStates
from minigpt5.sampling import SamplingParams

STATE_TOLERANCE = 1e-4  # batched (padded) vs alone: float rounding in the batched matmuls only


def _engine(pipe, **options):
    d = pipe.decoder
    return DecodeEngine(
        d.llm,
        d.tokenizer,
        voken_ids=d.engine.voken_ids,
        eos_id=d.engine.eos_id,
        banned_ids=d.engine.banned_ids,
        **options,
    )


def _requests(pipe, count, **overrides):
    out = []
    for i in range(count):
        params = dict(max_tokens=10 + 7 * (i % 4), random_seed=100 + i, force_image=(i % 2 == 0))
        params.update(overrides)
        req = pipe.request(f"story number {i} " + "about a cat " * (i % 3), **params)
        out.append(pipe.decoder.make_request(f"r{i}", pipe.prompts.prompt_ids(req), None, req.sampling))
    return out


def _run(engine, requests, arrivals=None):
    """Submit requests at given step numbers; returns per-request (token_ids, voken states)."""
    arrivals = arrivals or [0] * len(requests)
    results = {r.request_id: {"tokens": None, "states": []} for r in requests}
    step = 0
    pending = sorted(zip(arrivals, range(len(requests))))
    while pending or engine.has_work:
        while pending and pending[0][0] <= step:
            engine.submit(requests[pending.pop(0)[1]])
        for event in engine.step():
            if isinstance(event, VokenStates):
                results[event.request_id]["states"].append(event.states)
            elif isinstance(event, Finished):
                results[event.request_id]["tokens"] = event.token_ids
        step += 1
    return results


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_batched_equals_alone_whatever_the_arrival_order(reference_pipeline, temperature):
    pipe = reference_pipeline
    requests = _requests(pipe, 6, temperature=temperature)
    alone = {}
    for r in requests:
        alone.update(_run(_engine(pipe), [r]))
    for arrivals in ([0] * 6, [0, 3, 1, 7, 2, 5], [9, 0, 4, 0, 1, 12]):
        together = _run(_engine(pipe), requests, arrivals)
        for rid, expected in alone.items():
            assert together[rid]["tokens"] == expected["tokens"], rid
            assert len(together[rid]["states"]) == len(expected["states"])
            for a, b in zip(together[rid]["states"], expected["states"]):
                np.testing.assert_allclose(a, b, atol=STATE_TOLERANCE, rtol=0)


def test_abort_frees_the_row_and_others_continue(reference_pipeline):
    pipe = reference_pipeline
    engine = _engine(pipe)
    requests = _requests(pipe, 3, max_tokens=60, force_image=False, temperature=0.0)
    alone = {}
    for r in (requests[0], requests[2]):
        alone.update(_run(_engine(pipe), [r]))
    for r in requests:
        engine.submit(r)
    engine.step()
    assert len(engine.rows) == 3
    used_before = engine.kv_positions_in_use
    engine.abort("r1")
    events = engine.step()
    assert any(isinstance(e, Finished) and e.request_id == "r1" and e.reason == "aborted" for e in events)
    assert [row.request_id for row in engine.rows] == ["r0", "r2"]
    assert engine.kv_positions_in_use < used_before
    tokens = {}
    while engine.has_work:
        tokens.update({e.request_id: e.token_ids for e in engine.step() if isinstance(e, Finished)})
    assert tokens == {rid: result["tokens"] for rid, result in alone.items()}  # r2's slot moved, intact
    assert engine.kv_positions_in_use == 0


def test_decode_steps_write_the_kv_cache_in_place(reference_pipeline):
    engine = _engine(reference_pipeline)
    for r in _requests(reference_pipeline, 4, max_tokens=40, force_image=False):
        engine.submit(r)
    engine.step()
    assert engine._kv.slot_positions >= max(row.length for row in engine.rows) + 5  # no growth due
    storage = [t.data_ptr() for t in engine._kv.keys + engine._kv.values]
    for _ in range(5):
        engine.step()
    assert [t.data_ptr() for t in engine._kv.keys + engine._kv.values] == storage


def test_a_preallocated_kv_pool_never_grows_and_gives_the_same_tokens(reference_pipeline):
    requests = _requests(reference_pipeline, 6, temperature=1.0)
    grown = _run(_engine(reference_pipeline), requests)
    engine = _engine(reference_pipeline, preallocate_kv=True, max_rows=8)
    positions = reference_pipeline.decoder.llm.config.max_position_embeddings
    assert [tuple(t.shape) for t in engine._kv.keys][0][::2] == (8, positions)
    storage = [t.data_ptr() for t in engine._kv.keys + engine._kv.values]
    preallocated = _run(engine, requests, arrivals=[0, 0, 1, 3, 3, 9])
    assert [t.data_ptr() for t in engine._kv.keys + engine._kv.values] == storage
    assert {k: v["tokens"] for k, v in preallocated.items()} == {k: v["tokens"] for k, v in grown.items()}


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_static_decode_gives_the_dynamic_steps_tokens_and_voken_states(reference_pipeline, temperature, monkeypatch):
    """The CUDA-graph step's computation (batch padded to a bucket, keys over a bucket of positions),
    run eagerly on the CPU: small key buckets so that rows cross buckets while decoding."""
    monkeypatch.setattr(decode_graphs, "MIN_KEY_BUCKET", 16)
    requests = _requests(reference_pipeline, 6, temperature=temperature)
    dynamic = _run(_engine(reference_pipeline, max_rows=8), requests, arrivals=[0, 0, 1, 3, 3, 9])
    engine = _engine(reference_pipeline, max_rows=8, static_decode=True)
    assert engine._static.batch_buckets == [1, 2, 4, 8] and engine._static.key_buckets[:3] == [16, 32, 64]
    buckets = []
    run = engine._static.run
    monkeypatch.setattr(
        engine._static, "run", lambda ids, positions: buckets.append((len(ids), max(positions))) or run(ids, positions)
    )
    static = _run(engine, requests, arrivals=[0, 0, 1, 3, 3, 9])
    assert 3 in {n for n, _ in buckets} and max(p for _, p in buckets) > 64  # padded; several key buckets
    for rid, expected in dynamic.items():
        assert static[rid]["tokens"] == expected["tokens"], rid
        assert len(static[rid]["states"]) == len(expected["states"]) > 0 or not expected["states"]
        for a, b in zip(static[rid]["states"], expected["states"]):
            np.testing.assert_allclose(a, b, atol=STATE_TOLERANCE, rtol=0)


def test_static_step_error_compares_the_two_steps_without_taking_one(reference_pipeline, monkeypatch):
    engine = _engine(reference_pipeline, max_rows=8, static_decode=True)
    assert engine.static_step_error() is None  # no rows
    for r in _requests(reference_pipeline, 3, max_tokens=30, force_image=False):
        engine.submit(r)
    engine.step()
    engine.step()
    lengths = [row.length for row in engine.rows]
    assert engine.static_step_error() < 1e-5
    assert [row.length for row in engine.rows] == lengths  # no step taken
    monkeypatch.setattr(decode_graphs, "_bucket", lambda need, buckets: 8)  # attends to 8 keys only
    assert engine.static_step_error() > 1e-3  # a wrong static step is seen


@pytest.mark.parametrize("fallback", [True, False])
def test_a_failed_graph_capture_falls_back_to_eager_or_fails_the_start(reference_pipeline, monkeypatch, fallback):
    class FailingCapture(decode_graphs.StaticDecodeStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.capture = True  # as on a GPU

        def capture_all(self):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(engine_module, "StaticDecodeStep", FailingCapture)
    if not fallback:
        with pytest.raises(RuntimeError, match="capturing"):
            _engine(reference_pipeline, max_rows=4, static_decode=True)
        return
    engine = _engine(reference_pipeline, max_rows=4, static_decode=True, capture_fallback=True)
    assert not engine.static_decode and engine.decode_mode == "eager" and "capturing" in engine.capture_error
    requests = _requests(reference_pipeline, 2, temperature=0.0)
    eager = {rid: result["tokens"] for rid, result in _run(_engine(reference_pipeline), requests).items()}
    assert {rid: result["tokens"] for rid, result in _run(engine, requests).items()} == eager


def test_static_decode_buckets():
    assert decode_graphs._buckets(1, 32) == [1, 2, 4, 8, 16, 32]
    assert decode_graphs._buckets(1, 24) == [1, 2, 4, 8, 16, 24]
    assert decode_graphs._buckets(256, 2048) == [256, 512, 1024, 2048]
    assert [decode_graphs._bucket(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_abort_of_a_waiting_request(reference_pipeline):
    engine = _engine(reference_pipeline, max_rows=1)
    a, b = _requests(reference_pipeline, 2, max_tokens=20)
    engine.submit(a)
    engine.submit(b)
    engine.abort("r1")
    events = engine.step()
    assert any(isinstance(e, Finished) and e.request_id == "r1" and e.reason == "aborted" for e in events)


def test_oversize_request_refused_others_wait_their_turn(reference_pipeline):
    pipe = reference_pipeline
    small = _requests(pipe, 3, max_tokens=30, force_image=False)
    budget = small[0].reserved_tokens + small[1].reserved_tokens + 5  # room for two, not three
    engine = _engine(pipe, kv_budget_tokens=budget)
    huge = pipe.decoder.make_request("huge", list(range(3, 200)), None, SamplingParams(max_tokens=budget))
    with pytest.raises(AdmissionError, match="KV-cache budget"):
        engine.submit(huge)
    for r in small:
        engine.submit(r)
    engine.step()
    assert len(engine.rows) == 2 and engine.num_waiting == 1  # the third waits, it is not dropped
    # what the serving metrics report: the reserved positions, and one prefill timing per admission
    assert engine.reserved_positions == small[0].reserved_tokens + small[1].reserved_tokens
    assert len(engine.step_prefill_seconds) == 2 and min(engine.step_prefill_seconds) > 0
    finished = set()
    while engine.has_work:
        finished |= {e.request_id for e in engine.step() if isinstance(e, Finished)}
    assert finished == {"r0", "r1", "r2"}
    assert engine.reserved_positions == 0 and engine.step_prefill_seconds == []


def test_context_limit_is_an_admission_error(reference_pipeline):
    engine = _engine(reference_pipeline)
    request = reference_pipeline.decoder.make_request("long", [1] * 1000, None, SamplingParams(max_tokens=100))
    with pytest.raises(AdmissionError, match="context of 1024"):
        engine.submit(request)


def test_sampling_filters_are_per_row():
    from minigpt5.sampling import filter_top_k_top_p

    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    kept = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    assert torch.isinf(kept[0, :2]).all() and not torch.isinf(kept[0, 2:]).any()  # row 0: top-2
    assert not torch.isinf(kept[1, 3]) and torch.isinf(kept[1, 0])  # row 1: top-p 0.5


def test_top_p_keeps_the_most_likely_token_and_its_ties():
    from minigpt5.sampling import filter_top_k_top_p

    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [0.0, 0.0, 9.0, 1.0]])
    kept = filter_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([0.1, 0.1]))
    assert torch.isinf(kept).tolist() == [[True, False, True, False], [True, True, False, True]]


def test_a_rows_draw_does_not_depend_on_its_batch_company():
    from minigpt5.sampling import SamplingParams, sample_tokens

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(seed=1), SamplingParams(temperature=0.0), SamplingParams(seed=3, top_k=5)]
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[0, [1, 2]] = seen[2, 7] = True
    together = sample_tokens(logits, params, seen, [p.generator() for p in params])
    alone = [sample_tokens(logits[i : i + 1], [p], seen[i : i + 1], [p.generator()])[0] for i, p in enumerate(params)]
    assert together == alone


def test_the_device_sort_draws_the_same_tokens_as_the_cpu_sort(monkeypatch):
    """On a GPU top-p sorts with torch.sort on the device, on the CPU with numpy; sorting is exact, so
    both give the same tokens (checked on the CPU, where both run)."""
    import minigpt5.sampling as sampling

    logits = 3 * torch.randn(16, 500, generator=torch.Generator().manual_seed(1))
    params = [sampling.SamplingParams(seed=i, top_p=0.8, top_k=40 if i % 2 else 0) for i in range(16)]
    seen = torch.zeros(16, 500, dtype=torch.bool)
    seen[:, :20] = True
    with_numpy = sampling.sample_tokens(logits, params, seen, [p.generator() for p in params])
    monkeypatch.setattr(sampling, "sorted_values", lambda values: torch.sort(values, dim=-1).values)
    assert sampling.sample_tokens(logits, params, seen, [p.generator() for p in params]) == with_numpy


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    from minigpt5.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 2.0], [2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False], [False, False, False]])
    penalised = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 2.0]))
    assert penalised.tolist() == [[1.0, -4.0, 2.0], [2.0, -2.0, 2.0]]
