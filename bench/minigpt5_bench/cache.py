"""`minigpt5-bench cache`: the image-embedding cache and the decoder's prefix cache, on and off in one run.

In-process, no Triton: the vision stage and the real `DecodeEngine` over one set of weights (the
built-in tiny weights by default). Two decoder stages share the LLM, one with the prefix cache
(`cache`) and one without (`no_cache`); the `cache` path also puts the embedding cache that `minigpt5`
uses (serving/embedding_cache.py) in front of the vision stage. Both caches start empty in every
repeat, and the two paths alternate, so the shared machine's noise hits both alike.

Workloads (docs/BENCHMARKS.md, "bench cache"):
  chat    --turns turns, one new image per human turn; each turn's prompt holds every earlier turn,
          its images and the model's answers (as `minigpt5 chat` sends them). TTFT = the turn's
          images and text in hand -> the step that returns its first text or voken states (image
          embeddings, prompt building and the prefill included); prefill positions computed; images
          given to the vision encoder.
  shared  --concurrency requests with different user messages under the one system prompt,
          submitted together: prefill positions per request, tokens/s from the submission to the
          last Finished.
Sampling is seeded (temperature --temperature, the served top-p and repetition penalty): tokens
must be the same with and without the caches, and the JSON says whether they were.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from .cache_served import ttft_by_turn, ttft_ratios
from .models import USER_MESSAGES
from .report import Report
from .timing import log

MODES = ("no_cache", "cache")
TARGETS = {"turn_last_ttft_ratio_max": 0.5}
METHOD = {
    "paths": "no_cache: VisionStage.encode of every image of the prompt + DecodeEngine without a prefix cache; "
    "cache: EmbeddingCache in front of the same VisionStage + DecodeEngine with PrefixCache; one LLM",
    "ttft": "the turn's text and images in hand -> return of the engine step that yields its first TextDelta or "
    "VokenStates: embeddings, prompt ids, make_request, prefill and first sample included; median "
    "(ttft_ms) and best (ttft_ms_best) over --repeats after one untimed chat per path, caches emptied "
    "before every repeat",
    "prefill_positions": "prompt positions the engine computed (DecodeEngine.prefill_positions_computed)",
    "vision": "calls and images given to the vision encoder",
    "tokens_per_s": "completion tokens of all requests / wall time from submission to the last Finished; best of "
    "--repeats",
    "served": "the chat through two real tritonservers (caches as configured / both off), alternating; new "
    "pictures and words every repeat; TTFT = gRPC send -> first non-empty text event (cache_served.py)",
}


def build(ctx: dict, args) -> dict:
    from minigpt5.placement import resolve_device, resolve_dtype
    from minigpt5.stages import DecoderStage, PromptBuilder, VisionStage
    from minigpt5.weights.layout import WeightsDir
    from minigpt5.weights.tiny import resolve_weights

    start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    weights = WeightsDir(resolve_weights(args.weights))
    cached = DecoderStage.load(
        weights, device, dtype, prefix_cache_tokens=args.prefix_cache_tokens, prefix_block_tokens=args.block_tokens
    )
    plain = DecoderStage(cached.llm, cached.tokenizer, weights.tokens)
    vision = VisionStage.load(weights, device, dtype)
    vision.warmup()
    rng = np.random.default_rng(args.seed)
    ctx.update(
        weights=weights,
        stages={"cache": cached, "no_cache": plain},
        vision=vision,
        prompts=PromptBuilder(weights, cached.tokenizer),
        pictures=rng.integers(0, 256, size=(args.turns, 224, 224, 3), dtype=np.uint8),
    )
    return {
        "weights": str(weights.path),
        "device": device,
        "dtype": str(dtype).split(".")[-1],
        "block_tokens": args.block_tokens,
        "prefix_cache_tokens": args.prefix_cache_tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ---- one path ---------------------------------------------------------------------------------------
class CachePath:
    """One path (`cache` or `no_cache`) with empty caches and its own vision counters."""

    def __init__(self, ctx: dict, mode: str, args):
        from minigpt5.serving.embedding_cache import EmbeddingCache

        self.ctx, self.mode, self.args = ctx, mode, args
        self.stage = ctx["stages"][mode]
        self.engine = self.stage.engine
        if self.engine.prefix_cache is not None:
            self.engine.prefix_cache.clear()
        self.embeddings = EmbeddingCache(args.embedding_cache_mb * 2**20, "bench") if mode == "cache" else None
        self.vision_calls = self.vision_images = 0

    def _encode(self, images: np.ndarray) -> np.ndarray:
        self.vision_calls += 1
        self.vision_images += len(images)
        return self.ctx["vision"].encode(images).numpy()

    def decode_request(self, request_id: str, request):
        import torch

        ids = self.ctx["prompts"].prompt_ids(request)
        if not len(request.images):
            return self.stage.make_request(request_id, ids, None, request.sampling)
        if self.embeddings is None:
            return self.stage.make_request(
                request_id, ids, torch.from_numpy(self._encode(request.images)), request.sampling
            )
        entries, _ = self.embeddings.encode(request.images, self._encode)
        embeds = torch.from_numpy(np.stack([entry.embeds for entry in entries]))
        return self.stage.make_request(request_id, ids, embeds, request.sampling, [entry.key for entry in entries])


def _request(ctx: dict, args, text: str, images, history, seed: int):
    from minigpt5.request import build_request

    return build_request(
        text,
        images,
        history,
        defaults=ctx["weights"].defaults,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        random_seed=seed,
        max_images=0,
    )


def chat(ctx: dict, args, mode: str) -> dict:
    """One chat, turn by turn, with empty caches at its start."""
    from minigpt5.engine import Finished, TextDelta, VokenStates
    from minigpt5.prompt import Turn

    path = CachePath(ctx, mode, args)
    engine = path.engine
    history: list = []
    turns: list[dict] = []
    for turn in range(args.turns):
        text = f"Turn {turn + 1}: what happens in this picture?"
        start = time.perf_counter()
        request = _request(ctx, args, text, ctx["pictures"][: turn + 1], history, args.seed + turn)
        computed, vision_images = engine.prefill_positions_computed, path.vision_images
        decode = path.decode_request(f"{mode}-turn{turn}", request)
        engine.submit(decode)
        first, finished = None, None
        while engine.has_work:
            for event in engine.step():
                if first is None and isinstance(event, (TextDelta, VokenStates)):
                    first = time.perf_counter() - start
                if isinstance(event, Finished):
                    finished = event
        if finished is None:
            raise RuntimeError(f"turn {turn + 1}: the engine ran out of work without finishing it")
        turns.append(
            {
                "ttft_ms": (first if first is not None else time.perf_counter() - start) * 1e3,
                "prompt_positions": decode.prompt_embeds.shape[0],
                "prefill_positions": engine.prefill_positions_computed - computed,
                "vision_images": path.vision_images - vision_images,
                "token_ids": finished.token_ids,
            }
        )
        history = history + [Turn("human", text, 1), Turn("assistant", finished.text)]
    return {
        "turns": turns,
        "vision_calls": path.vision_calls,
        "vision_images": path.vision_images,
        "distinct_images": args.turns,
    }


def shared(ctx: dict, args, mode: str) -> dict:
    """--concurrency requests under the one system prompt, submitted together, caches empty."""
    from minigpt5.engine import Finished

    path = CachePath(ctx, mode, args)
    requests = [
        path.decode_request(
            f"{mode}-shared{i}",
            _request(
                ctx, args, f"Request {i + 1}. {USER_MESSAGES[i % len(USER_MESSAGES)]}", None, [], args.seed + 100 + i
            ),
        )
        for i in range(args.concurrency)
    ]
    computed = path.engine.prefill_positions_computed
    start = time.perf_counter()
    for request in requests:
        path.engine.submit(request)
    finished = {}
    while path.engine.has_work:
        finished.update({e.request_id: e for e in path.engine.step() if isinstance(e, Finished)})
    wall = time.perf_counter() - start
    tokens = sum(event.completion_tokens for event in finished.values())
    return {
        "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        "prompt_positions_per_request": statistics.mean(r.prompt_embeds.shape[0] for r in requests),
        "prefill_positions_per_request": (path.engine.prefill_positions_computed - computed) / len(requests),
        "token_ids": [finished[r.request_id].token_ids for r in requests],
    }


# ---- the run ----------------------------------------------------------------------------------------
def _alternate(fn, ctx: dict, args, name: str) -> dict:
    """`fn` for both paths in every repeat, the order alternating; {mode: [result per repeat]}."""
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for mode in MODES:  # untimed: first-call costs stay out of the medians
        fn(ctx, args, mode)
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            runs[mode].append(fn(ctx, args, mode))
        log(f"{name}: repeat {repeat + 1}/{args.repeats}")
    return runs


def chat_section(ctx: dict, args) -> dict:
    runs = _alternate(chat, ctx, args, "chat")
    out: dict[str, Any] = {}
    for mode, results in runs.items():
        last = results[-1]
        out[mode] = {
            **ttft_by_turn(results, args.turns),
            "prompt_positions": [turn["prompt_positions"] for turn in last["turns"]],
            "prefill_positions": [turn["prefill_positions"] for turn in last["turns"]],
            "vision_images": [turn["vision_images"] for turn in last["turns"]],
            "vision_calls_total": last["vision_calls"],
            "vision_images_total": last["vision_images"],
        }
    tokens = {mode: [[turn["token_ids"] for turn in r["turns"]] for r in results] for mode, results in runs.items()}
    out["same_tokens"] = all(t == tokens["no_cache"][0] for mode in MODES for t in tokens[mode])
    out["distinct_images"] = args.turns
    out.update(ttft_ratios(out))
    return out


def shared_section(ctx: dict, args) -> dict:
    runs = _alternate(shared, ctx, args, "shared")
    out: dict[str, Any] = {
        mode: {
            "tokens_per_s": round(max(r["tokens_per_s"] for r in results), 1),
            "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in results), 1),
            "prompt_positions_per_request": results[-1]["prompt_positions_per_request"],
            "prefill_positions_per_request": results[-1]["prefill_positions_per_request"],
        }
        for mode, results in runs.items()
    }
    out["requests"] = args.concurrency
    out["same_tokens"] = all(r["token_ids"] == runs["no_cache"][0]["token_ids"] for mode in MODES for r in runs[mode])
    out["tokens_per_s_ratio"] = round(out["cache"]["tokens_per_s"] / out["no_cache"]["tokens_per_s"], 3)
    return out


def served_section(ctx: dict, args) -> dict:
    from .cache_served import measure

    return measure(args, ctx["weights"].path)


def summary(data: dict) -> dict:
    chat_result, shared_result = data.get("chat") or {}, data.get("shared") or {}
    out: dict[str, Any] = {"targets": TARGETS}
    served = data.get("served") or {}
    if "ttft_ratio" in served:
        out["served_turn_last_ttft_ratio"] = served["ttft_ratio"][-1]
        out["served_turn_last_ttft_ratio_best"] = served["ttft_ratio_best"][-1]
        out["served_same_text"] = served["same_text"]
        out["served_vision_images"] = served["cache"]["vision_images_total"]
    if "ttft_ratio" in chat_result:
        out["turn_last_ttft_ratio"] = chat_result["ttft_ratio"][-1]
        out["turn_last_ttft_ratio_best"] = chat_result["ttft_ratio_best"][-1]
        out["chat_vision_images"] = chat_result["cache"]["vision_images_total"]
        out["chat_vision_images_no_cache"] = chat_result["no_cache"]["vision_images_total"]
        out["chat_same_tokens"] = chat_result["same_tokens"]
        out["met"] = {
            "turn_last_ttft_ratio": out["turn_last_ttft_ratio"] <= TARGETS["turn_last_ttft_ratio_max"],
            "vision_images_equal_distinct": out["chat_vision_images"] == chat_result["distinct_images"],
            "same_tokens": chat_result["same_tokens"] and shared_result.get("same_tokens", True),
        }
    if "tokens_per_s_ratio" in shared_result:
        out["shared_tokens_per_s_ratio"] = shared_result["tokens_per_s_ratio"]
        out["shared_prefill_positions_per_request"] = {
            mode: shared_result[mode]["prefill_positions_per_request"] for mode in MODES
        }
    return out


def main(args) -> int:
    import torch

    from minigpt5.placement import resolve_device

    default_threads = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if resolve_device(args.device) == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        report = Report("cache", out=args.out, skip=args.skip)
        report.set(
            ("config",),
            {
                "turns": args.turns,
                "concurrency": args.concurrency,
                "repeats": args.repeats,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "threads": torch.get_num_threads(),
                "threads_default": default_threads,
            },
        )
        report.set(("method",), METHOD)
        ctx: dict = {}
        with torch.inference_mode():
            report.section(("build",), lambda: build(ctx, args), required=True)
            if "stages" in ctx:
                report.section(("chat",), lambda: chat_section(ctx, args))
                report.section(("shared",), lambda: shared_section(ctx, args))
                report.section(("served",), lambda: served_section(ctx, args))
        report.set(("summary",), summary(report.data))
        return report.finish()
    finally:
        torch.set_num_threads(default_threads)
