"""`minigpt5-bench cache`, section `served`: the chat through the real tritonserver, caches on and off.

Two servers on free ports over the same weights: one as configured (both caches on) and one with
`minigpt5.image_embedding_cache_mb` and `vicuna_decoder.prefix_cache_tokens` at 0. The chat goes to
each in turn, the order alternating per repeat, over gRPC streaming with the images pre-processed
by the client and the earlier turns sent back as `history` (as `minigpt5 chat` does). Every repeat
uses new pictures and words, so its turns find nothing cached but the system prompt, as on a
server that has served before. TTFT = the send -> the first non-empty `text` event; prefill
positions from `usage` (prompt positions less `cached_prompt_positions`); images encoded from
Triton's `nv_inference_count` of `vision_encoder`.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from .timing import log

CACHES_OFF = {"minigpt5": {"image_embedding_cache_mb": "0"}, "vicuna_decoder": {"prefix_cache_tokens": "0"}}
STARTUP_TIMEOUT_S = 300.0


def measure(args, weights: Path) -> dict:
    from minigpt5.launcher.local import local_process

    servers = {
        mode: local_process(
            weights,
            device=args.device,
            parameters=CACHES_OFF if mode == "no_cache" else None,
            name=f"bench-cache-{mode}",
        )
        for mode in ("no_cache", "cache")
    }
    try:
        started = time.perf_counter()
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(timeout=STARTUP_TIMEOUT_S)
        startup_s = time.perf_counter() - started
        runs: dict[str, list[dict]] = {mode: [] for mode in servers}
        for server in servers.values():  # untimed warm-up chat
            served_chat(server, args, repeat=-1)
        for repeat in range(args.repeats):
            for mode in ("no_cache", "cache") if repeat % 2 == 0 else ("cache", "no_cache"):
                runs[mode].append(served_chat(servers[mode], args, repeat))
            log(f"served: repeat {repeat + 1}/{args.repeats}")
    finally:
        codes = {mode: server.stop() for mode, server in servers.items()}
    return _summarize(runs, args, startup_s, codes)


def served_chat(server, args, repeat: int) -> dict:
    from .serving_cost import stream_served, text_of

    rng = np.random.default_rng(args.seed + 1000 + repeat)
    pictures = rng.integers(0, 256, size=(args.turns, 224, 224, 3), dtype=np.uint8)
    url = f"127.0.0.1:{server.grpc_port}"
    metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    encoded_before = _vision_images(metrics_url)
    history: list[dict] = []
    turns: list[dict] = []
    for turn in range(args.turns):
        text = f"Chat {repeat + 1}, turn {turn + 1}: what happens in this picture?"
        params = {
            "text_input": text,
            "images": pictures[: turn + 1],
            "history": json.dumps(history),
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "random_seed": args.seed + turn,
            "max_images": 0,
        }
        end_s, events = stream_served(url, params)
        answer, ttft, usage = "", None, {}
        for stamp, arrays in events:
            piece = text_of(arrays, "text_output")
            if text_of(arrays, "event_type") == "text" and piece:
                ttft = stamp if ttft is None else ttft
                answer += piece
            if text_of(arrays, "usage"):
                usage = json.loads(text_of(arrays, "usage"))
        positions = usage["prompt_tokens"] + usage["image_tokens"]
        turns.append(
            {
                "ttft_ms": (ttft if ttft is not None else end_s) * 1e3,
                "prompt_positions": positions,
                "prefill_positions": positions - usage["cached_prompt_positions"],
                "text": answer,
            }
        )
        history += [{"role": "human", "text": text, "num_images": 1}, {"role": "assistant", "text": answer}]
    return {"turns": turns, "vision_images": _vision_images(metrics_url) - encoded_before}


def _vision_images(metrics_url: str) -> int:
    """Images `vision_encoder` has encoded (Triton's nv_inference_count counts batch rows)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("nv_inference_count{") and 'model="vision_encoder"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _summarize(runs: dict, args, startup_s: float, exit_codes: dict) -> dict:

    out = {"startup_s": round(startup_s, 1), "exit_codes": exit_codes, "caches_off": CACHES_OFF}
    for mode, results in runs.items():
        last = results[-1]
        out[mode] = {
            **ttft_by_turn(results, args.turns),
            "prompt_positions": [turn["prompt_positions"] for turn in last["turns"]],
            "prefill_positions": [turn["prefill_positions"] for turn in last["turns"]],
            "vision_images_total": [r["vision_images"] for r in results],
        }
    out["distinct_images"] = args.turns
    out["same_text"] = all(
        [t["text"] for t in a["turns"]] == [t["text"] for t in b["turns"]]
        for a, b in zip(runs["cache"], runs["no_cache"])
    )
    out.update(ttft_ratios(out))
    return out


def ttft_by_turn(results: list[dict], turns: int) -> dict:
    """Median and best TTFT of each turn over the repeats."""
    samples = [[r["turns"][t]["ttft_ms"] for r in results] for t in range(turns)]
    return {
        "ttft_ms": [round(statistics.median(s), 3) for s in samples],
        "ttft_ms_best": [round(min(s), 3) for s in samples],
    }


def ttft_ratios(out: dict) -> dict:
    """cache / no_cache per turn, of the medians and of the best runs."""
    return {
        name: [round(c / n, 3) for c, n in zip(out["cache"][key], out["no_cache"][key])]
        for name, key in (("ttft_ratio", "ttft_ms"), ("ttft_ratio_best", "ttft_ms_best"))
    }
