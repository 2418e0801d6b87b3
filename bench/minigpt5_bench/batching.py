"""`minigpt5-bench batching`: continuous batching against the run-to-completion baseline.

In-process, no Triton: the real `DecodeEngine` over the LLM of a weights directory (the built-in tiny
weights by default), driven by this thread. Two engines share the one LLM: the served one
(`continuous`) and `DecodeEngine(..., run_to_completion=True)` (`run_to_completion`, classic static
batching: nothing is admitted until the whole running batch has finished). Both run the same
workloads in the same run, interleaved, so the shared machine's noise hits both alike.

Workloads (docs/BENCHMARKS.md, "bench batching"):
  throughput  N requests submitted together (N in --concurrency), each --max-tokens tokens;
              tokens generated / wall time from the submission to the last Finished event. Every
              level and both engines run once per repeat, interleaved.
  ttft        4 long requests (--long-tokens) start together; --short-requests short requests
              (--short-tokens) arrive one by one while they run, at fixed offsets. TTFT = scheduled
              arrival → the step that returns the request's first TextDelta or VokenStates. The same
              short requests are also run alone on the idle engine; the ratio of the two p95s is
              the slowdown a newcomer sees because others are already being served.

Every request runs to its token budget: EOS and every token whose text contains '#' (so '###' cannot
be spelled) are banned for this bench, images are off (max_images 0), and the counted tokens are
reported (`tokens.all_full_length`). Sampling is the served default (temperature 1, top-p 0.9,
repetition penalty 2) with a fixed seed per request.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from .models import USER_MESSAGES
from .report import Report
from .stats import p95, ratio
from .timing import log

MODES = ("continuous", "run_to_completion")
LONG_REQUESTS = 4
TARGETS = {"throughput_gain_min": 4.0, "short_ttft_p95_ratio_max": 2.0}
SHORT_ARRIVAL_WINDOW = (0.1, 0.75)  # short arrivals spread over this fraction of the long run (calibrated)
METHOD = {
    "engine": "minigpt5.engine.DecodeEngine, driven by the bench thread: submit at the scheduled offsets "
    "(at step boundaries, as the served engine loop admits), step(), timestamp each step's events",
    "baseline": "DecodeEngine(run_to_completion=True) over the same LLM: requests wait until the whole "
    "running batch has finished",
    "throughput": "N requests submitted together; completion tokens of all / wall time from submission to "
    "the last Finished; levels and engines interleaved in every repeat; best of --repeats "
    "(tokens_per_s_median beside it)",
    "ttft": "scheduled arrival -> return of the step that yields the first TextDelta or VokenStates of "
    "the request (waiting for the step in progress counts, as it does for a served request)",
    "short_ttft_p95_ratio": "p95 TTFT of the short requests arriving while 4 long ones run / p95 TTFT "
    "of the same short requests alone on the idle engine (nearest-rank p95 over "
    "--short-requests x --repeats samples)",
    "fixed_length": "EOS and all ids whose text contains '#' banned, max_images 0: every request runs to "
    "its max_tokens",
}


# ---- the engines ------------------------------------------------------------------------------------
def build(ctx: dict, args) -> dict:
    """The LLM, the two engines over it, the prompts, and the bench's token bans."""
    import torch

    from minigpt5.placement import resolve_device, resolve_dtype
    from minigpt5.stages import DecoderStage

    start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.weights is not None or args.preset == "tiny":
        from minigpt5.stages import PromptBuilder
        from minigpt5.weights.layout import WeightsDir
        from minigpt5.weights.tiny import resolve_weights

        weights = WeightsDir(resolve_weights(args.weights))
        stage = DecoderStage.load(weights, device, dtype)
        tokens = weights.tokens
        builder = PromptBuilder(weights, stage.tokenizer)
        prompts = [builder.prompt_ids(_request(text, weights.defaults)) for text in USER_MESSAGES]
        source = {"weights": str(weights.path), "prompts": "the served prompt template around USER_MESSAGES"}
    else:  # --preset full without --weights: random LLM built on the device, as `bench e2e`
        from .models import BASE_VOCAB, bench_arch, bench_tokenizer, build_module, prompt_ids, token_ids

        tokenizer = bench_tokenizer(args.preset)
        tokens = token_ids(tokenizer)
        torch.manual_seed(args.seed)
        llm = build_module("llm", bench_arch(args.preset), torch.device(device), dtype)
        stage = DecoderStage(llm, tokenizer, tokens)
        prompts = [
            prompt_ids(tokens, 80, BASE_VOCAB[args.preset], seed=i, with_image=False) for i in range(len(USER_MESSAGES))
        ]
        source = {"weights": f"random {args.preset} preset built on {device}", "prompts": "80 random ids"}
    baseline = DecoderStage(stage.llm, stage.tokenizer, tokens, run_to_completion=True)
    banned = _fixed_length_bans(stage.tokenizer, tokens["eos_id"])
    for engine in (stage.engine, baseline.engine):
        engine.banned_ids = sorted(set(engine.banned_ids) | set(banned))
    ctx.update(
        stage=stage,
        engines={"continuous": stage.engine, "run_to_completion": baseline.engine},
        prompts=prompts,
        device=device,
    )
    return {
        **source,
        "seconds": round(time.perf_counter() - start, 2),
        "device": device,
        "dtype": str(dtype).split(".")[-1],
        "vocab_size": len(stage.tokenizer),
        "banned_ids": len(banned),
        "prompt_positions": sorted({len(p) for p in prompts}),
    }


def _request(text: str, defaults: dict):
    from minigpt5.request import build_request

    return build_request(text, defaults=defaults, max_tokens=1, random_seed=0)


def _fixed_length_bans(tokenizer, eos_id: int) -> list[int]:
    """EOS and every id whose text contains '#': no sequence can then spell the stop text '###'."""
    banned = {eos_id}
    for token_id in range(len(tokenizer)):
        if "#" in tokenizer.decode([token_id]):
            banned.add(token_id)
    return sorted(banned)


# ---- driving an engine ------------------------------------------------------------------------------
class Workload:
    """Requests with scheduled arrival offsets (seconds from the start of the run)."""

    def __init__(self, ctx: dict, args, name: str):
        self.ctx, self.args, self.name = ctx, args, name
        self.items: list[tuple[float, Any, str]] = []  # (offset_s, DecodeRequest, kind)

    def add(self, offset_s: float, kind: str, index: int, max_tokens: int, seed: int) -> None:
        from minigpt5.sampling import SamplingParams

        prompts = self.ctx["prompts"]
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=self.args.temperature,
            top_p=0.9,
            repetition_penalty=2.0,
            seed=seed,
            max_images=0,
        )
        request_id = f"{self.name}-{kind}-{index}"
        request = self.ctx["stage"].make_request(request_id, prompts[index % len(prompts)], None, params)
        self.items.append((offset_s, request, kind))


def drive(engine, workload: Workload) -> dict:
    """Submit each request at its offset (between steps), step until all finished; per-request times."""
    from minigpt5.engine import Finished, TextDelta, VokenStates

    from .decode import drain_engine

    if engine.has_work:
        raise RuntimeError("engine busy before a run")
    pending = sorted(workload.items, key=lambda item: item[0])
    records = {
        request.request_id: {
            "kind": kind,
            "arrival_s": offset,
            "first_s": None,
            "done_s": None,
            "tokens": 0,
            "expected": request.params.max_tokens,
            "reason": None,
        }
        for offset, request, kind in pending
    }
    budget_steps = 4 * sum(r["expected"] for r in records.values()) + 1000
    steps = 0
    start = time.perf_counter()
    try:
        while pending or engine.has_work:
            now = time.perf_counter() - start
            while pending and pending[0][0] <= now:
                engine.submit(pending.pop(0)[1])
            if not engine.has_work:
                time.sleep(max(0.0, pending[0][0] - now))
                continue
            events = engine.step()
            stamp = time.perf_counter() - start
            steps += 1
            if steps > budget_steps:
                raise RuntimeError(f"{workload.name}: more than {budget_steps} steps, the engine does not finish")
            for event in events:
                record = records[event.request_id]
                if isinstance(event, (TextDelta, VokenStates)) and record["first_s"] is None:
                    record["first_s"] = stamp
                elif isinstance(event, Finished):
                    record.update(done_s=stamp, tokens=event.completion_tokens, reason=event.reason)
    except BaseException:
        drain_engine(engine, list(records))
        raise
    for record in records.values():
        if record["first_s"] is None:  # nothing was released before the end (cannot happen at >= 2 tokens)
            record["first_s"] = record["done_s"]
    return {"records": records, "wall_s": max(r["done_s"] for r in records.values()), "steps": steps}


# ---- statistics -------------------------------------------------------------------------------------
def latency_summary(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(p95(ms), 3),
        "max_ms": round(max(ms), 3),
        "min_ms": round(min(ms), 3),
        "n": len(ms),
    }


class TokenCount:
    def __init__(self):
        self.counted = self.expected = self.requests = self.short = 0

    def add(self, run: dict) -> None:
        for record in run["records"].values():
            self.counted += record["tokens"]
            self.expected += record["expected"]
            self.requests += 1
            self.short += record["tokens"] < record["expected"]

    def as_dict(self) -> dict:
        return {
            "counted": self.counted,
            "expected": self.expected,
            "requests": self.requests,
            "all_full_length": self.short == 0,
            "requests_short_of_max_tokens": self.short,
        }


# ---- the workloads ----------------------------------------------------------------------------------
def warmup(ctx: dict, args) -> dict:
    for mode in MODES:
        workload = Workload(ctx, args, f"warmup-{mode}")
        for i in range(2):
            workload.add(0.0, "warmup", i, 8, seed=10_000 + i)
        drive(ctx["engines"][mode], workload)
    return {"requests_per_mode": 2, "max_tokens": 8}


def throughput(ctx: dict, args, concurrency: list[int], tokens: TokenCount) -> dict:
    """Every concurrency level and both engines once per repeat, interleaved: a slow spell of the
    shared machine then lands on all levels alike instead of on one (the gain is a ratio of levels).
    `tokens_per_s` is the best of the repeats (others' load on a shared machine only ever slows a
    run down, by up to 2x here); the median is reported beside it."""
    samples: dict[tuple[int, str], list[tuple]] = {(c, mode): [] for c in concurrency for mode in MODES}
    for repeat in range(args.repeats):
        for c in concurrency:
            for mode in _order(repeat + c):
                workload = Workload(ctx, args, f"c{c}-r{repeat}-{mode}")
                for i in range(c):
                    workload.add(0.0, "batch", i, args.max_tokens, seed=i)
                run = drive(ctx["engines"][mode], workload)
                tokens.add(run)
                generated = sum(r["tokens"] for r in run["records"].values())
                samples[c, mode].append((generated / run["wall_s"], run["wall_s"], generated, run["steps"]))
        log(
            f"throughput repeat {repeat}: "
            + ", ".join(
                f"c{c} {samples[c, 'continuous'][-1][0]:.0f}/{samples[c, 'run_to_completion'][-1][0]:.0f}"
                for c in concurrency
            )
            + " tok/s (continuous/run_to_completion)"
        )
    result = {}
    for c in concurrency:
        entry = {"concurrency": c, "max_tokens": args.max_tokens}
        for mode in MODES:
            runs = samples[c, mode]
            rates = [r[0] for r in runs]
            entry[mode] = {
                "tokens_per_s": round(max(rates), 1),
                "tokens_per_s_median": round(statistics.median(rates), 1),
                "wall_ms": round(min(r[1] for r in runs) * 1e3, 1),
                "tokens": runs[0][2],
                "steps": runs[0][3],
                "tokens_per_s_samples": [round(r, 1) for r in rates],
            }
        result[f"c{c}"] = entry
    return result


def ttft(ctx: dict, args, tokens: TokenCount) -> dict:
    """Short requests alone, then the same ones arriving while 4 long requests run; both engines."""
    # Calibration: how long 4 long requests take alone (continuous engine), to place the arrivals.
    calib = Workload(ctx, args, "calibration")
    for i in range(LONG_REQUESTS):
        calib.add(0.0, "long", i, args.long_tokens, seed=100 + i)
    long_s = drive(ctx["engines"]["continuous"], calib)["wall_s"]
    low, high = SHORT_ARRIVAL_WINDOW
    count = args.short_requests
    offsets = [long_s * (low + (high - low) * i / max(1, count - 1)) for i in range(count)]

    alone: dict[str, list] = {mode: [] for mode in MODES}
    busy: dict[str, list] = {mode: [] for mode in MODES}
    short_latency: dict[str, list] = {mode: [] for mode in MODES}
    busy_rates: dict[str, list] = {mode: [] for mode in MODES}
    long_done: dict[str, list] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in _order(repeat):
            engine = ctx["engines"][mode]
            for i in range(count):
                workload = Workload(ctx, args, f"alone-r{repeat}-{mode}-{i}")
                workload.add(0.0, "short", LONG_REQUESTS + i, args.short_tokens, seed=200 + i)
                run = drive(engine, workload)
                tokens.add(run)
                alone[mode] += [r["first_s"] - r["arrival_s"] for r in run["records"].values()]
            workload = Workload(ctx, args, f"busy-r{repeat}-{mode}")
            for i in range(LONG_REQUESTS):
                workload.add(0.0, "long", i, args.long_tokens, seed=100 + i)
            for i, offset in enumerate(offsets):
                workload.add(offset, "short", LONG_REQUESTS + i, args.short_tokens, seed=200 + i)
            run = drive(engine, workload)
            tokens.add(run)
            records = run["records"].values()
            shorts = [r for r in records if r["kind"] == "short"]
            this_busy = [r["first_s"] - r["arrival_s"] for r in shorts]
            busy[mode] += this_busy
            short_latency[mode] += [r["done_s"] - r["arrival_s"] for r in shorts]
            busy_rates[mode].append(sum(r["tokens"] for r in records) / run["wall_s"])
            long_done[mode].append(max(r["done_s"] for r in records if r["kind"] == "long"))
            log(
                f"ttft repeat {repeat} {mode:>17}: short TTFT busy p95 {p95(this_busy) * 1e3:.1f} ms, "
                f"alone p95 {p95(alone[mode][-count:]) * 1e3:.1f} ms"
            )
    result = {
        "long_requests": LONG_REQUESTS,
        "long_tokens": args.long_tokens,
        "short_requests": count,
        "short_tokens": args.short_tokens,
        "long_alone_ms": round(long_s * 1e3, 1),
        "short_arrivals_ms": [round(o * 1e3, 1) for o in offsets],
    }
    for mode in MODES:
        alone_s, busy_s = latency_summary(alone[mode]), latency_summary(busy[mode])
        result[mode] = {
            "alone": alone_s,
            "busy": busy_s,
            "short_ttft_p95_ratio": ratio(busy_s["p95_ms"], alone_s["p95_ms"]),
            "short_latency_busy": latency_summary(short_latency[mode]),
            "long_done_ms": round(statistics.median(long_done[mode]) * 1e3, 1),
            "busy_tokens_per_s": round(statistics.median(busy_rates[mode]), 1),
        }
    return result


def _order(repeat: int) -> tuple:
    """Alternate which engine goes first, so a drift in the machine's load does not favour one."""
    return MODES if repeat % 2 == 0 else MODES[::-1]


# ---- summary ----------------------------------------------------------------------------------------
def summarize(data: dict, concurrency: list[int]) -> None:
    gain_at = 8 if 8 in concurrency else max([c for c in concurrency if c <= 8] or [max(concurrency)])
    ttft_result = data.get("ttft") or {}
    for mode in MODES:
        rates = {}
        for c in concurrency:
            entry = (data.get("throughput") or {}).get(f"c{c}") or {}
            rates[str(c)] = (entry.get(mode) or {}).get("tokens_per_s")
        ttft_mode = ttft_result.get(mode) or {}
        data[mode] = {
            "throughput_tokens_per_s": rates,
            "throughput_gain": ratio(rates.get(str(gain_at)), rates.get("1"), 2),
            "throughput_gain_by_concurrency": {c: ratio(v, rates.get("1"), 2) for c, v in rates.items()},
            "short_ttft_p95_ratio": ttft_mode.get("short_ttft_p95_ratio"),
            "short_ttft_p95_ms": {
                "alone": (ttft_mode.get("alone") or {}).get("p95_ms"),
                "busy": (ttft_mode.get("busy") or {}).get("p95_ms"),
            },
            "busy_tokens_per_s": ttft_mode.get("busy_tokens_per_s"),
        }
    data["throughput_gain_at"] = gain_at
    data["targets"] = dict(TARGETS)
    gain, ttft_ratio = data["continuous"]["throughput_gain"], data["continuous"]["short_ttft_p95_ratio"]
    data["targets_met"] = {
        "throughput_gain": None if gain is None or gain_at != 8 else gain >= TARGETS["throughput_gain_min"],
        "short_ttft_p95_ratio": None if ttft_ratio is None else ttft_ratio <= TARGETS["short_ttft_p95_ratio_max"],
    }


def main(args) -> int:
    import torch

    from minigpt5.placement import resolve_device

    report = Report("batching", out=args.out)
    default_threads = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if resolve_device(args.device) == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run(args, report, default_threads)
    finally:  # a caller in the same process (the tests) gets its thread count back
        torch.set_num_threads(default_threads)


def _run(args, report: Report, default_threads: int) -> int:
    import torch

    concurrency = sorted(set(args.concurrency) | {1})
    report.data.update(
        {
            "preset": args.preset,
            "threads": torch.get_num_threads(),
            "threads_default": default_threads,
            "settings": {
                "concurrency": concurrency,
                "max_tokens": args.max_tokens,
                "long_tokens": args.long_tokens,
                "short_tokens": args.short_tokens,
                "short_requests": args.short_requests,
                "long_requests": LONG_REQUESTS,
                "repeats": args.repeats,
                "temperature": args.temperature,
                "top_p": 0.9,
                "repetition_penalty": 2.0,
                "seeds": "fixed per request",
            },
            "method": METHOD,
        }
    )
    ctx: dict = {}
    report.section(("build",), lambda: build(ctx, args), required=True)
    if not ctx:
        return report.finish()
    report.data["device"] = ctx["device"]
    tokens = TokenCount()
    report.section(("warmup",), lambda: warmup(ctx, args), required=True)
    report.section(("throughput",), lambda: throughput(ctx, args, concurrency, tokens), required=True)
    report.section(("ttft",), lambda: ttft(ctx, args, tokens), required=True)
    report.data["tokens"] = tokens.as_dict()
    summarize(report.data, concurrency)
    _log_summary(report.data)
    return report.finish()


def _log_summary(data: dict) -> None:
    for mode in MODES:
        s = data[mode]
        log(
            f"{mode:>17}: tokens/s {s['throughput_tokens_per_s']}, gain {s['throughput_gain']}x, "
            f"short TTFT p95 ratio {s['short_ttft_p95_ratio']} {s['short_ttft_p95_ms']}"
        )
    log(f"targets {data['targets']} met: {data['targets_met']}; tokens {data['tokens']}")
