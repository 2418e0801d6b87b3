"""Decode ms/token through the real DecodeEngine at a given batch size, and its HBM floor.

B requests with text-only prompts of `prompt_positions` are submitted and stepped until all run
together; then `steps` engine steps are timed. Each step gives every row one token, so the median
step time is the per-token latency each user sees at that batch size. Images are disabled
(max_images 0) and EOS is banned, so no row finishes or widens a step while being timed. The time
includes what the engine really does per step: the batched forward, lm_head, per-row sampling on the
CPU (repetition penalty, top-p) and streaming detokenisation.
"""

from __future__ import annotations

import time

from minigpt5.sampling import SamplingParams

from .models import kv_bytes_per_position, llm_bytes, prompt_ids
from .stats import summarize
from .timing import log, synchronize


def engine_decode(
    decoder_stage, tokens: dict, device, *, batch: int, prompt_positions: int, steps: int, warmup: int, base_vocab: int
) -> dict:
    """With static decode on (CUDA graphs on a GPU), the same rows are then timed for `steps` more
    steps with it off: `eager_ms_per_token` and `speedup_vs_eager` come from the same run."""
    engine = decoder_stage.engine
    if engine.has_work:
        raise RuntimeError("engine busy before the decode bench")
    if batch > engine.max_rows:
        raise RuntimeError(f"batch {batch} exceeds the engine's max_rows ({engine.max_rows})")
    compare = engine.static_decode
    max_tokens = warmup + steps * (2 if compare else 1) + 8
    ids = [f"bench-decode-{batch}-{i}" for i in range(batch)]
    try:
        for i, request_id in enumerate(ids):
            prompt = prompt_ids(tokens, prompt_positions, base_vocab, seed=i, with_image=False)
            params = SamplingParams(max_tokens=max_tokens, seed=i, max_images=0)
            engine.submit(decoder_stage.make_request(request_id, prompt, None, params))
        admit_steps, admit_ms = _admit_all(engine, device, batch)
        for _ in range(warmup):
            engine.step()
        static_error = engine.static_step_error() if compare else None
        kv_start = _kv_valid(engine)
        samples = _timed_steps(engine, device, steps)
        kv_end = _kv_valid(engine)
        eager = _timed_steps_eager(engine, device, steps) if compare else None
        if len(engine.rows) != batch or any(row.finish_reason for row in engine.rows):
            raise RuntimeError("a row finished while being timed")
        allocated = engine.kv_positions_in_use
    finally:  # leave the engine empty for the next section, also after a failure
        drain_engine(engine, ids)
    timing = summarize(samples)
    result = {
        "batch": batch,
        "method": "DecodeEngine.step",
        "decode_mode": engine.decode_mode,
        "prompt_positions": prompt_positions,
        "admission_steps": admit_steps,
        "admission_ms": round(admit_ms, 1),
        "ms_per_token": timing["ms"],
        "tokens_per_s": round(batch * 1e3 / timing["ms"], 1),
        "kv_positions_per_row_mean": round((kv_start + kv_end) / 2 / batch, 1),
        "kv_positions_allocated_end": allocated,
        "step": timing,
    }
    if eager:
        eager_timing = summarize(eager)
        result["static_vs_eager_error"] = static_error
        result.update(
            {
                "eager_ms_per_token": eager_timing["ms"],
                "speedup_vs_eager": round(eager_timing["ms"] / timing["ms"], 3),
                "eager_step": eager_timing,
            }
        )
    return result


def _admit_all(engine, device, batch: int) -> tuple[int, float]:
    admit_steps = 0
    synchronize(device)
    start = time.perf_counter()
    while engine.num_waiting or len(engine.rows) < batch:
        engine.step()
        admit_steps += 1
        if admit_steps > batch + 16:
            raise RuntimeError(f"only {len(engine.rows)} of {batch} rows admitted (engine limits?)")
    synchronize(device)
    return admit_steps, (time.perf_counter() - start) * 1e3


def _timed_steps(engine, device, steps: int) -> list[float]:
    samples = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        engine.step()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _timed_steps_eager(engine, device, steps: int) -> list[float]:
    static, engine.static_decode = engine.static_decode, False
    try:
        engine.step()  # untimed: warms the dynamic step's kernels
        return _timed_steps(engine, device, steps)
    finally:
        engine.static_decode = static


def drain_engine(engine, request_ids: list[str]) -> None:
    """Abort the bench's requests: one step removes them; if stepping fails, drop the running rows."""
    for request_id in request_ids:
        engine.abort(request_id)
    try:
        for _ in range(4):
            if not engine.has_work:
                return
            engine.step()
    except Exception as exc:  # noqa: BLE001 - the section's own error is the one reported
        log(f"draining the engine failed ({type(exc).__name__}: {exc}); dropping its rows")
    if engine.has_work:
        engine.drop_running()


def _kv_valid(engine) -> int:
    return sum(row.length for row in engine.rows)


def hbm_floor(llm, result: dict, gbps: float | None) -> dict:
    """Floor of one decode step: bytes it must read / bandwidth. `floor_weights_ms` counts the weights
    (all LLM parameters but the input-embedding table: 'LLM weight bytes / HBM bandwidth', the
    usual decode floor); `floor_with_kv_ms` adds each row's valid KV cache at the timed steps' mean length."""
    weights = llm_bytes(llm)
    kv_per_row = kv_bytes_per_position(llm) * result["kv_positions_per_row_mean"]
    out = {
        "read_per_step_bytes": weights["read_per_step_bytes"],
        "kv_bytes_per_step": int(kv_per_row * result["batch"]),
        "bytes_per_element": llm.dtype.itemsize,
        "gbps": gbps,
    }
    if not gbps:
        out.update(
            {"floor_weights_ms": None, "ratio_to_floor": None, "floor_with_kv_ms": None, "ratio_to_floor_with_kv": None}
        )
        return out
    floor = weights["read_per_step_bytes"] / (gbps * 1e9) * 1e3
    floor_kv = (weights["read_per_step_bytes"] + out["kv_bytes_per_step"]) / (gbps * 1e9) * 1e3
    out.update(
        {
            "floor_weights_ms": _sig(floor),
            "ratio_to_floor": _sig(result["ms_per_token"] / floor),
            "floor_with_kv_ms": _sig(floor_kv),
            "ratio_to_floor_with_kv": _sig(result["ms_per_token"] / floor_kv),
        }
    )
    return out


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def decode_sweep_estimate_s(
    ms_per_token: float | None, batch: int, steps: int, warmup: int, prefill_ms: float | None
) -> float:
    """Rough seconds for one batch size, from measured batch-1 numbers (sampling grows with rows)."""
    if ms_per_token is None:
        return 0.0
    per_step = ms_per_token * (1 + 0.05 * batch)
    return (per_step * (steps + warmup + 4) + (prefill_ms or 0.0) * batch) / 1e3
