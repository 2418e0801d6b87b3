"""Prefix cache in the decoding engine: hits, misses, eviction under the KV budget, aborts while a
prefix is shared, and tokens and voken states equal to those without the cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from minigpt5.engine import DecodeEngine, Finished, VokenStates
from minigpt5.prefix_cache import PrefixCache, weights_fingerprint
from minigpt5.prompt import Turn

STATE_TOLERANCE = 1e-4  # a remainder prefill vs a whole one: float rounding only
BLOCK = 16


def _engine(pipe, cache: PrefixCache | None, llm=None, **options):
    d = pipe.decoder
    return DecodeEngine(
        llm or d.llm,
        d.tokenizer,
        voken_ids=d.engine.voken_ids,
        eos_id=d.engine.eos_id,
        banned_ids=d.engine.banned_ids,
        prefix_cache=cache,
        **options,
    )


@pytest.fixture(scope="module")
def chat(reference_pipeline):
    """A 3-turn chat, one image per human turn, each turn's prompt holding the earlier ones, plus two
    requests that share only the system prompt."""
    pipe = reference_pipeline
    rng = np.random.default_rng(5)
    pictures = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    embeds = pipe.vision.encode(pictures)
    history, prompts = [], []
    for turn in range(3):
        text = f"Turn {turn}: what do you see in this picture of a garden?"
        request = pipe.request(text, pictures[: turn + 1], history)
        prompts.append((pipe.prompts.prompt_ids(request), embeds[: turn + 1]))
        history = history + [Turn("human", text, 1), Turn("assistant", f"A garden number {turn}, green and wide.")]
    for text in ("Tell me a story about a cat.", "Write a poem about the sea."):
        prompts.append((pipe.prompts.prompt_ids(pipe.request(text)), None))
    return prompts


def _requests(pipe, prompts, temperature, **params):
    stage = pipe.decoder
    out = []
    for i, (ids, embeds) in enumerate(prompts):
        sampling = pipe.request(
            "x",
            max_tokens=params.get("max_tokens", 12),
            random_seed=40 + i,
            temperature=temperature,
            force_image=params.get("force_image", i % 2 == 0),
        ).sampling
        out.append(stage.make_request(f"r{i}", ids, embeds, sampling))
    return out


def _one_by_one(engine, requests) -> dict:
    """Each request alone, in order (a chat: the next turn comes after the answer)."""
    results = {}
    for request in requests:
        engine.submit(request)
        states = []
        while engine.has_work:
            for event in engine.step():
                if isinstance(event, VokenStates):
                    states.append(event.states)
                elif isinstance(event, Finished):
                    results[event.request_id] = (event, states)
    return results


def _assert_same(with_cache: dict, without: dict) -> None:
    assert with_cache.keys() == without.keys()
    for rid, (finished, states) in without.items():
        cached_finished, cached_states = with_cache[rid]
        assert cached_finished.token_ids == finished.token_ids, rid
        assert len(cached_states) == len(states)
        for a, b in zip(cached_states, states):
            np.testing.assert_allclose(a, b, atol=STATE_TOLERANCE, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_cached_prefixes_give_the_same_tokens_and_voken_states(reference_pipeline, chat, temperature):
    pipe = reference_pipeline
    plain = _engine(pipe, None)
    cached = _engine(pipe, PrefixCache(BLOCK, 4096))
    without = _one_by_one(plain, _requests(pipe, chat, temperature))
    with_cache = _one_by_one(cached, _requests(pipe, chat, temperature))
    _assert_same(with_cache, without)
    reused = {rid: finished.cached_positions for rid, (finished, _) in with_cache.items()}
    assert reused["r0"] == 0 and all(finished.cached_positions == 0 for finished, _ in without.values())
    # each later turn reuses at least the whole earlier prompt (but its last partial block)
    for turn in (1, 2):
        earlier = len(chat[turn - 1][0]) + 31 * (turn)  # positions of the earlier prompt
        assert reused[f"r{turn}"] >= earlier // BLOCK * BLOCK - BLOCK
    assert reused["r3"] > 0 and reused["r4"] > 0  # the system prompt
    stats = cached.prefix_cache.stats
    assert stats.hits * BLOCK == cached.prefill_positions_reused == sum(reused.values())
    assert (
        stats.misses > 0
        and cached.prefill_positions_computed + cached.prefill_positions_reused == plain.prefill_positions_computed
    )


def test_a_miss_computes_everything_and_fills_the_cache(reference_pipeline, chat):
    pipe = reference_pipeline
    cache = PrefixCache(BLOCK, 4096)
    engine = _engine(pipe, cache)
    (request,) = _requests(pipe, chat[3:4], 0.0)
    result = _one_by_one(engine, [request])
    length = request.prompt_embeds.shape[0]
    assert result["r0"][0].cached_positions == 0
    assert cache.stats.hits == 0 and cache.stats.misses == length // BLOCK == cache.blocks
    assert engine.prefill_positions_computed == length and engine.prefill_positions_reused == 0
    layers, heads = pipe.decoder.llm.config.num_hidden_layers, pipe.decoder.llm.config.num_key_value_heads
    head_dim = pipe.decoder.llm.config.hidden_size // pipe.decoder.llm.config.num_attention_heads
    assert cache.nbytes == cache.blocks * 2 * layers * heads * BLOCK * head_dim * 4  # fp32 keys and values


def test_blocks_are_evicted_before_a_request_waits(reference_pipeline, chat):
    """A budget that the cache plus a running row would overrun: the cache gives way, the request is
    admitted at once, and the cache never holds more than the budget the rows leave free."""
    pipe = reference_pipeline
    cache = PrefixCache(BLOCK, 10_000)
    probe = _requests(pipe, chat, 0.0, max_tokens=20)
    budget = max(r.reserved_tokens for r in probe) + 2 * BLOCK
    engine = _engine(pipe, cache, kv_budget_tokens=budget)
    requests = _requests(pipe, chat, 0.0, max_tokens=20)
    for request in requests:
        engine.submit(request)
        engine.step()  # admitted in this very step: nothing else runs, the cache only gives way
        assert [row.request_id for row in engine.rows] == [request.request_id]
        assert cache.positions + request.reserved_tokens <= budget
        while engine.has_work:
            engine.step()
    assert cache.stats.evicted > 0
    without = _one_by_one(_engine(pipe, None), _requests(pipe, chat, 0.0, max_tokens=20))
    again = _one_by_one(_engine(pipe, PrefixCache(BLOCK, 3 * BLOCK)), _requests(pipe, chat, 0.0, max_tokens=20))
    _assert_same(again, without)  # a cache too small for whole prompts: partial chains, same tokens


def test_the_cache_respects_its_own_limit_and_evicts_the_least_recently_used(reference_pipeline, chat):
    pipe = reference_pipeline
    cache = PrefixCache(BLOCK, 8 * BLOCK)
    engine = _engine(pipe, cache)
    requests = _requests(pipe, chat, 0.0)
    _one_by_one(engine, requests[3:5])  # two prompts sharing the system prompt's blocks
    assert cache.positions <= 8 * BLOCK
    shared = [h for h in requests[3].block_hashes if h in requests[4].block_hashes]
    assert shared and all(cache.match([h], 1) for h in shared)  # the shared root was used last: kept
    _one_by_one(engine, requests[:1])  # a long image prompt pushes older blocks out, root first kept
    assert cache.positions <= 8 * BLOCK and cache.stats.evicted > 0


def test_abort_while_a_prefix_is_shared(reference_pipeline, chat):
    """Two rows run on one cached prefix; aborting the one that filled the cache leaves the other's
    tokens and the cache intact, and a later request still hits it."""
    pipe = reference_pipeline
    cache = PrefixCache(BLOCK, 4096)
    engine = _engine(pipe, cache)
    lone = dict(max_tokens=40, force_image=False)
    first, second, later = _requests(pipe, [chat[1], chat[2], chat[2]], 0.0, **lone)
    alone = _one_by_one(_engine(pipe, None), _requests(pipe, [chat[2]], 0.0, **lone))
    engine.submit(first)
    engine.step()
    engine.submit(second)
    for _ in range(3):
        engine.step()
    assert [row.request_id for row in engine.rows] == ["r0", "r1"]
    assert engine.rows[1].cached_positions > 0
    blocks = cache.blocks
    engine.abort("r0")
    results = {}
    while engine.has_work:
        results.update({e.request_id: e for e in engine.step() if isinstance(e, Finished)})
    assert results["r0"].reason == "aborted"
    assert results["r1"].token_ids == alone["r0"][0].token_ids
    assert cache.blocks >= blocks
    again = _one_by_one(engine, [later])
    assert again["r2"][0].token_ids == alone["r0"][0].token_ids
    assert again["r2"][0].cached_positions >= results["r1"].cached_positions


def test_a_cache_never_serves_blocks_of_other_weights(reference_pipeline, chat):
    pipe = reference_pipeline
    other = copy.deepcopy(pipe.decoder.llm)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    assert weights_fingerprint(other) != weights_fingerprint(pipe.decoder.llm)
    cache = PrefixCache(BLOCK, 4096)
    _one_by_one(_engine(pipe, cache), _requests(pipe, chat[3:4], 0.0))
    filled = cache.blocks
    engine = _engine(pipe, cache, llm=other)
    result = _one_by_one(engine, _requests(pipe, chat[3:4], 0.0))
    assert result["r0"][0].cached_positions == 0 and cache.stats.hits == 0 and cache.blocks == 2 * filled
    plain = _engine(pipe, None, llm=other)
    assert result["r0"][0].token_ids == _one_by_one(plain, _requests(pipe, chat[3:4], 0.0))["r0"][0].token_ids
