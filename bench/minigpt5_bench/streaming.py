"""Streamed tokens/s of the served path against the engine alone, and where the CPU goes.

Part of `minigpt5-bench serving`. Text-only requests of `--stream-tokens` tokens with fixed seeds
(seeds whose answers sample no image, found in-process first), N concurrent streams, each stream
sending its next request when its last one ended (closed loop), `--stream-rounds` requests per
stream, alternating served and engine alone `--stream-repeats` times (best run of each kept):

  served       the thin client's AsyncClient over gRPC streaming, all N streams on one event loop;
               tokens are the `completion_tokens` of the final events.
  engine alone the same requests (same prompt ids, sampling and seeds, hence the same tokens) on the
               in-process `DecodeEngine`, driven the same closed-loop way: no Triton, no IPC.

CPU seconds of every process (tritonserver, each python stub by model, the bench process itself as the
client) are read from /proc before and after each served run; `cpu_s_per_1k_tokens` divides them by
the tokens streamed. The same for the bench process during the engine-alone run.

The short-request TTFT check: 4 long streamed requests run while short ones arrive one after another;
the same short ones also run alone. `short_ttft_p95_ratio` = p95 busy / p95 alone (send -> first text).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

from .stats import p95, rounded_all
from .timing import log

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LONG_REQUESTS = 4


# ---- the requests -----------------------------------------------------------------------------------
def text_seeds(pipeline, count: int, max_tokens: int, first_seed: int, prompt: str) -> list[int]:
    """`count` seeds from `first_seed` on whose answers sample no image: a text-only workload."""
    from minigpt5.engine import VokenStates

    engine, seed = pipeline.decoder.engine, first_seed
    seeds: list[int] = []
    while len(seeds) < count:
        batch = list(range(seed, seed + 32))
        seed += 32
        with_image = set()
        for s in batch:
            engine.submit(_decode_request(pipeline, prompt, s, max_tokens, f"seed-{s}"))
        while engine.has_work:
            with_image |= {e.request_id for e in engine.step() if isinstance(e, VokenStates)}
        seeds += [s for s in batch if f"seed-{s}" not in with_image]
    return seeds[:count]


def _decode_request(pipeline, prompt: str, seed: int, max_tokens: int, request_id: str):
    request = pipeline.request(prompt, max_tokens=max_tokens, random_seed=seed)
    return pipeline.decoder.make_request(request_id, pipeline.prompts.prompt_ids(request), None, request.sampling)


def split_streams(seeds: list[int], streams: int, rounds: int) -> list[list[int]]:
    """Stream i sends seeds[i], seeds[i + streams], ...: `rounds` requests each."""
    return [[seeds[i + r * streams] for r in range(rounds)] for i in range(streams)]


# ---- engine alone -----------------------------------------------------------------------------------
def engine_alone(pipeline, prompt: str, per_stream: list[list[int]], max_tokens: int) -> dict:
    """The closed-loop workload on the in-process engine: a stream's next request is submitted at the
    step boundary after its last one finished."""
    from minigpt5.engine import Finished

    engine = pipeline.decoder.engine
    queues = {i: list(seeds) for i, seeds in enumerate(per_stream)}
    owner: dict[str, int] = {}
    tokens = requests = 0

    def submit(stream: int) -> None:
        seed = queues[stream].pop(0)
        request_id = f"alone-{stream}-{seed}"
        owner[request_id] = stream
        engine.submit(_decode_request(pipeline, prompt, seed, max_tokens, request_id))

    cpu, start = time.process_time(), time.perf_counter()
    for stream in queues:
        submit(stream)
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, Finished):
                tokens += event.completion_tokens
                requests += 1
                stream = owner.pop(event.request_id)
                if queues[stream]:
                    submit(stream)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return {
        "tokens": tokens,
        "requests": requests,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "cpu_s_per_1k_tokens": {"bench (engine)": round(1000 * cpu / max(tokens, 1), 3)},
    }


# ---- served -----------------------------------------------------------------------------------------
def served_streams(url: str, prompt: str, per_stream: list[list[int]], max_tokens: int, server) -> dict:
    """The same workload through the server; CPU seconds of every process from /proc."""
    before, start = process_cpu(server), time.perf_counter()
    tokens, requests = asyncio.run(_served(url, prompt, per_stream, max_tokens))
    seconds = time.perf_counter() - start
    after = process_cpu(server)
    cpu = {name: round(1000 * (after[name] - before.get(name, 0.0)) / max(tokens, 1), 3) for name in after}
    return {
        "tokens": tokens,
        "requests": requests,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "cpu_s_per_1k_tokens": cpu,
    }


async def _served(url: str, prompt: str, per_stream: list[list[int]], max_tokens: int) -> tuple[int, int]:
    from minigpt5_client import AsyncClient

    counts = {"tokens": 0, "requests": 0}
    async with AsyncClient(url, protocol="grpc", timeout=600) as client:

        async def one_stream(seeds: list[int]) -> None:
            for seed in seeds:
                async for event in client.stream(prompt, max_tokens=max_tokens, seed=seed):
                    usage = getattr(event, "usage", None)
                    if usage is not None:
                        counts["tokens"] += usage["completion_tokens"]
                        counts["requests"] += 1

        await asyncio.gather(*(one_stream(seeds) for seeds in per_stream))
    return counts["tokens"], counts["requests"]


def process_cpu(server) -> dict[str, float]:
    """CPU seconds (user + system) so far of tritonserver, each python stub (by model) and this process."""
    cpu = {"tritonserver": _cpu_seconds(server.process.pid)}
    for pid, model in server.stubs().items():
        cpu[f"stub {model}"] = cpu.get(f"stub {model}", 0.0) + _cpu_seconds(pid)
    cpu["bench (client)"] = time.process_time()
    return cpu


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15 of stat)


def measure_throughput(pipeline, server, url: str, args, prompt: str) -> dict:
    """Served and engine alone at each --streams level, alternating --stream-repeats times. The best
    run of each is kept (another process on a shared machine only ever slows a run down), and their
    ratio; the medians are beside them."""
    import torch

    levels = sorted({int(n) for n in args.streams.split(",")})
    seeds = text_seeds(pipeline, max(levels) * args.stream_rounds, args.stream_tokens, args.seed + 100_000, prompt)
    out: dict = {
        "stream_tokens": args.stream_tokens,
        "rounds": args.stream_rounds,
        "repeats": args.stream_repeats,
        "threads": torch.get_num_threads(),
        "levels": {},
    }
    served_streams(url, prompt, split_streams(seeds, 2, 1), args.stream_tokens, server)  # warm-up
    for n in levels:
        per_stream = split_streams(seeds, n, args.stream_rounds)
        runs: dict[str, list] = {"served": [], "engine_alone": []}
        for repeat in range(args.stream_repeats):
            for side in ("served", "engine_alone") if repeat % 2 == 0 else ("engine_alone", "served"):
                runs[side].append(
                    served_streams(url, prompt, per_stream, args.stream_tokens, server)
                    if side == "served"
                    else engine_alone(pipeline, prompt, per_stream, args.stream_tokens)
                )
        served, alone = (max(runs[side], key=lambda run: run["tokens_per_s"]) for side in ("served", "engine_alone"))
        ratio = round(served["tokens_per_s"] / alone["tokens_per_s"], 3)
        out["levels"][str(n)] = {
            "served": served,
            "engine_alone": alone,
            "served_over_engine": ratio,
            "served_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs["served"]),
            "engine_alone_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs["engine_alone"]),
            "same_tokens": len({r["tokens"] for r in runs["served"] + runs["engine_alone"]}) == 1,
        }
        log(
            f"{n} streams: served {served['tokens_per_s']} tokens/s, engine alone {alone['tokens_per_s']} "
            f"tokens/s (best of {args.stream_repeats}) = {ratio}; CPU s per 1k tokens {served['cpu_s_per_1k_tokens']}"
        )
    return out


# ---- short-request TTFT under long ones ----------------------------------------------------------
def measure_short_ttft(url: str, args, prompt: str) -> dict:
    return asyncio.run(_short_ttft(url, args, prompt))


async def _short_ttft(url: str, args, prompt: str) -> dict:
    """Short requests one after another, alone, then while 4 long greedy ones (which run to their
    max_tokens) decode; a busy sample counts only if a long request was still running when it ended."""
    from minigpt5_client import AsyncClient

    long_params = {"max_tokens": args.long_tokens, "temperature": 0.0, "repetition_penalty": 1.0}
    async with AsyncClient(url, protocol="grpc", timeout=600) as client:

        async def first_text_ms(seed: int, started: asyncio.Event | None = None, **params) -> float | None:
            start, first = time.perf_counter(), None
            async for event in client.stream(prompt, seed=seed, **params):
                if first is None and getattr(event, "text", None):
                    first = (time.perf_counter() - start) * 1e3
                    if started is not None:
                        started.set()
            return first

        async def under_long_ones(shorts: list[int]) -> list:
            decoding = [asyncio.Event() for _ in range(LONG_REQUESTS)]
            longs = [
                asyncio.create_task(first_text_ms(args.seed + 300_000 + i, decoding[i], **long_params))
                for i in range(LONG_REQUESTS)
            ]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in decoding)), timeout=600)
            busy = []
            for seed in shorts:
                ttft = await first_text_ms(seed, max_tokens=args.short_tokens)
                if all(task.done() for task in longs):
                    break  # the long ones ended first: this sample was not taken under load
                busy.append(ttft)
            await asyncio.gather(*longs)
            return busy

        shorts = [args.seed + 200_000 + i for i in range(args.short_requests)]
        alone, busy = [], []
        for _ in range(args.stream_repeats):  # alternating, so that a slow spell of the machine hits both
            alone += [await first_text_ms(s, max_tokens=args.short_tokens) for s in shorts]
            busy += await under_long_ones(shorts)
    alone_p95, busy_p95 = p95([a for a in alone if a]), p95([b for b in busy if b]) if busy else None
    return {
        "alone_ms": rounded_all(alone),
        "busy_ms": rounded_all(busy),
        "alone_p95_ms": round(alone_p95, 2),
        "busy_p95_ms": None if busy_p95 is None else round(busy_p95, 2),
        "short_ttft_p95_ratio": None if busy_p95 is None else round(busy_p95 / alone_p95, 3),
        "busy_samples": len(busy),
        "long_tokens": args.long_tokens,
    }
