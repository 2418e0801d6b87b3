"""`minigpt5-bench serving`: what Triton costs, what overlapping the image decode gains, and how many
streamed tokens the served path pushes next to the engine alone (streaming.py).

Starts the real tritonserver (TritonProcess, free ports, the built-in tiny weights by default) and,
in this process, the in-process reference pipeline (`MiniGPT5Pipeline`) over the same weights. Two
requests, both with fixed seeds, each measured --requests times, interleaved:

  force_image request   "served vs in-process": the first seed from --seed whose image the decoder
                        does NOT sample on its own, so force_image (mode end) places [IMG0] at the last chance and
                        the image is decoded after the text on both paths. Nothing can overlap, so
                        served / in-process isolates the serving cost (BLS, IPC between the three
                        models, gRPC streaming, PNG encoding and decoding in the client is excluded).
  overlap request       "image overlap": the first seed from --seed whose decoder samples [IMG0] on its
                        own early (within the first quarter of the text budget) and then keeps writing
                        to max_tokens. Served, the image is decoded while the text goes on.
                        Sequential baseline: the decoder alone in this process (the same prompt ids
                        and sampling, so the same tokens and voken states; `vicuna_decoder` is
                        reached only through `minigpt5`'s link), then `image_decoder` alone over HTTP
                        with those voken states.
                        image_overlap_gain = (decoder-only + image-decoder-only) / served end to end.

Random weights never pick [IMG0] on purpose, so with force_image alone the image always comes last
(and overlap could never show): hence the seed search, done in-process before measuring (the served
tokens equal the in-process ones, and the JSON checks it: `same_text_as_in_process`, `same_image`).
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The Triton python stubs run with OMP_WAIT_POLICY=PASSIVE (launcher/binary.py). The in-process pipeline
# must too, or on a busy machine its spinning OpenMP workers make it up to 10x slower than the served
# path, and the ratio measures the spinning. OpenMP reads it once, when torch is first imported, so it
# is set here, before anything imports torch; `in_process_openmp.applied` says whether it was in time.
_TORCH_LOADED_BEFORE = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from . import stats, streaming  # noqa: E402
from .report import Report  # noqa: E402
from .stats import median, ratio  # noqa: E402
from .timing import log  # noqa: E402

PROMPT = "Tell me a story about a cat."
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0
METHOD = {
    "latency": "median end-to-end ms of a lone request: served = gRPC ModelStreamInfer on `minigpt5` "
    "(stream=true) from the send to the final response; in-process = MiniGPT5Pipeline.run in "
    "the bench process (vision none, decode, then the image). force_image, the image is the "
    "last thing generated (seed chosen so), so neither path can overlap anything",
    "overlap": "a request whose [IMG0] is sampled early (seed search) and whose text runs on to "
    "max_tokens; overlapped = served end to end; sequential = the decoder alone in the "
    "bench process (same prompt ids and sampling) + image_decoder alone (HTTP infer through "
    "Triton, its voken states); gain = median(sequential) / median(overlapped). The served "
    "path also does gRPC streaming, IPC and PNG encoding that the sequential sum leaves out, "
    "so the gain is if anything understated",
    "ideal_gain": "sequential / max(decoder-only, decoder-only time to the voken states + image-only): "
    "what perfect overlap on free cores would give",
    "ttft": "send -> first non-empty `text` event; ttfi: send -> the `image` event (PNG included)",
}


# ---- the server -------------------------------------------------------------------------------------
def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- the requests -----------------------------------------------------------------------------------
def seed_search(pipeline, args, *, kind: str) -> dict:
    """The first seed from --seed whose lone decode fits the request kind (see the module docstring).

    overlap: [IMG0] sampled (not forced) at token index <= overlap_window(max_tokens) and the text then
    runs to max_tokens. The prefix of a request without force_image does not depend on max_tokens, so
    candidates are first decoded only up to that index.
    force_image (mode end): [IMG0] placed at the last chance, index max_tokens - 8.
    --max-tokens counts generated positions, vokens included (as the figures were measured); the
    requests ask for that less the 7 forced vokens in sampled ids (`sampled_budget`): the same answers.
    """
    from minigpt5.config import NUM_VOKENS

    img0 = pipeline.weights.tokens["vokens"][0]
    window = overlap_window(args.max_tokens)
    for seed in range(args.seed, args.seed + args.search_seeds):
        if kind == "force_image":
            tokens, reason = _decode_only(pipeline, seed, sampled_budget(args.max_tokens), force_image=True)
            if img0 in tokens and tokens.index(img0) == args.max_tokens - NUM_VOKENS:
                return {
                    "seed": seed,
                    "image_token_index": tokens.index(img0),
                    "completion_tokens": len(tokens),
                    "finish_reason": reason,
                    "tried": seed - args.seed + 1,
                }
            continue
        prefix, _ = _decode_only(pipeline, seed, window + 1, force_image=False)
        if img0 not in prefix:
            continue
        tokens, reason = _decode_only(pipeline, seed, sampled_budget(args.max_tokens), force_image=False)
        if reason == "length" and tokens.index(img0) <= window:
            index = tokens.index(img0)
            return {
                "seed": seed,
                "image_token_index": index,
                "completion_tokens": len(tokens),
                "tokens_after_image": len(tokens) - index - NUM_VOKENS,
                "finish_reason": reason,
                "tried": seed - args.seed + 1,
            }
    raise RuntimeError(
        f"no {kind} seed in [{args.seed}, {args.seed + args.search_seeds}) (raise --search-seeds or --max-tokens)"
    )


def sampled_budget(max_tokens: int) -> int:
    """The request's max_tokens (sampled ids) for an answer of `max_tokens` positions with one image."""
    from minigpt5.config import NUM_VOKENS

    return max_tokens - (NUM_VOKENS - 1)


def overlap_window(max_tokens: int) -> int:
    """Latest token index for the overlap request's [IMG0]: the first quarter of the text budget (at
    least 4), so that about three quarters of the text is generated after the image."""
    from minigpt5.config import NUM_VOKENS

    return max(4, (max_tokens - NUM_VOKENS) // 4)


def _decode_only(pipeline, seed: int, max_tokens: int, *, force_image: bool) -> tuple[list[int], str]:
    from minigpt5.engine import Finished

    request = pipeline.request(
        PROMPT, max_tokens=max_tokens, random_seed=seed, force_image=force_image, force_image_mode="end"
    )
    engine = pipeline.decoder.engine
    decode = pipeline.decoder.make_request(
        f"search-{seed}-{max_tokens}", pipeline.prompts.prompt_ids(request), None, request.sampling
    )
    engine.submit(decode)
    finished = None
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, Finished):
                finished = event
    if finished is None:
        raise RuntimeError("the engine ran out of work without finishing the request")
    return finished.token_ids, finished.reason


def request_params(args, seed: int, force_image: bool) -> dict:
    return {
        "max_tokens": sampled_budget(args.max_tokens),
        "random_seed": seed,
        "force_image": force_image,
        "force_image_mode": "end",
        "num_inference_steps": args.steps,
    }


# ---- one measurement each ---------------------------------------------------------------------------
def stream_served(url: str, params: dict) -> tuple[float, list[tuple[float, dict]]]:
    """One streamed `minigpt5` request: its end and its responses, in seconds since the send."""
    from .reliability.wire import grpc_request, grpc_tensors

    outcome = grpc_request(url, grpc_tensors({**params, "stream": True}), timeout=REQUEST_TIMEOUT_S, record=True)
    if not outcome.ok:
        raise RuntimeError(f"minigpt5: {outcome.status} {outcome.message}")
    return outcome.seconds, outcome.responses


def text_of(arrays: dict, name: str) -> str:
    from .reliability.wire import first_value

    return first_value(arrays.get(name)) or ""


def served(url: str, args, seed: int, force_image: bool) -> dict:
    """The public model over gRPC streaming: end to end, first text, image_start, image."""
    end_s, events = stream_served(url, {"text_input": PROMPT, **request_params(args, seed, force_image)})
    out: dict[str, Any] = {
        "ms": end_s * 1e3,
        "ttft_ms": None,
        "image_start_ms": None,
        "ttfi_ms": None,
        "text": "",
        "images": [],
    }
    for stamp, arrays in events:
        kind = text_of(arrays, "event_type")
        text = text_of(arrays, "text_output")
        out["text"] += text
        if kind == "text" and text and out["ttft_ms"] is None:
            out["ttft_ms"] = stamp * 1e3
        if kind == "image_start" and out["image_start_ms"] is None:
            out["image_start_ms"] = stamp * 1e3
        if kind == "image":
            out["ttfi_ms"] = out["ttfi_ms"] or stamp * 1e3
            out["images"] += [_png(b) for b in arrays["image_output"].reshape(-1)]
    return out


def decoder_only(pipeline, args, seed: int, force_image: bool) -> dict:
    """The decoder alone, in this process (`vicuna_decoder` speaks only the link protocol of `minigpt5`,
    decoder_wire.py): the prompt ids and sampling the served request gets, hence the same tokens and
    voken states."""
    from minigpt5.engine import Finished, TextDelta, VokenStates

    request = pipeline.request(PROMPT, **request_params(args, seed, force_image))
    engine = pipeline.decoder.engine
    start = time.perf_counter()
    engine.submit(
        pipeline.decoder.make_request(
            f"decoder-only-{seed}", pipeline.prompts.prompt_ids(request), None, request.sampling
        )
    )
    out: dict[str, Any] = {"ms": None, "vokens_ms": None, "voken_states": None, "text": ""}
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, TextDelta):
                out["text"] += event.text
            elif isinstance(event, VokenStates) and out["voken_states"] is None:
                out["vokens_ms"] = (time.perf_counter() - start) * 1e3
                out["voken_states"] = event.states.numpy()[None].astype(np.float32)
            elif isinstance(event, Finished):
                out["ms"] = (time.perf_counter() - start) * 1e3
    if out["voken_states"] is None:
        raise RuntimeError("the decoder produced no voken states for the overlap request")
    return out


def image_only(http_url: str, voken_states: np.ndarray, seed: int, args) -> dict:
    """`image_decoder` alone over HTTP: the job the BLS model would queue for the first image."""
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    from minigpt5.image_decoder import SCHEDULERS, image_seed

    arrays = {
        "voken_states": voken_states,
        "seed": np.array([[image_seed(seed, 0)]], dtype=np.uint64),
        "guidance_scale": np.array([[7.5]], dtype=np.float32),
        "num_inference_steps": np.array([[args.steps]], dtype=np.int32),
        "scheduler_id": np.array([[SCHEDULERS.index("pndm")]], dtype=np.int32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    client = httpclient.InferenceServerClient(
        http_url, network_timeout=REQUEST_TIMEOUT_S, connection_timeout=REQUEST_TIMEOUT_S
    )
    try:
        start = time.perf_counter()
        result = client.infer(
            "image_decoder", inputs, outputs=[httpclient.InferRequestedOutput("image", binary_data=True)]
        )
        ms = (time.perf_counter() - start) * 1e3
    finally:
        client.close()
    return {"ms": ms, "image": result.as_numpy("image")[0]}


def in_process(pipeline, args, seed: int, force_image: bool) -> dict:
    start = time.perf_counter()
    result = pipeline.run(PROMPT, **request_params(args, seed, force_image))
    return {
        "ms": (time.perf_counter() - start) * 1e3,
        "text": result.text,
        "images": result.images,
        "token_ids": result.token_ids,
    }


def _png(data) -> np.ndarray:
    from PIL import Image

    raw = data if isinstance(data, bytes) else str(data).encode()
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(raw))).convert("RGB"))


# ---- statistics -------------------------------------------------------------------------------------
# ---- the run ----------------------------------------------------------------------------------------
def main(args) -> int:
    import torch

    from minigpt5.launcher.local import local_process
    from minigpt5.weights.tiny import resolve_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report("serving", out=args.out)
    weights = resolve_weights(args.weights)
    report.data.update(
        {
            "weights": str(weights),
            "device": args.device,
            "prompt": PROMPT,
            "method": METHOD,
            "in_process_openmp": {
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                "applied": not _TORCH_LOADED_BEFORE,
                "threads": torch.get_num_threads(),
            },
            "settings": {
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "steps": args.steps,
                "scheduler": "pndm",
                "guidance_scale": 7.5,
                "seed": args.seed,
                "search_seeds": args.search_seeds,
            },
        }
    )
    parameters = (
        {model: {"cpu_threads": str(args.threads)} for model in ("vision_encoder", "vicuna_decoder", "image_decoder")}
        if args.threads
        else None
    )
    server = local_process(weights, device=args.device, parameters=parameters, name="bench-serving")
    log_path = server.log_file
    report.data["server"] = {
        "grpc": f"127.0.0.1:{server.grpc_port}",
        "http": f"127.0.0.1:{server.http_port}",
        "log": str(log_path),
    }
    started = time.perf_counter()
    try:

        def start():  # the server loads its four models while this process loads the pipeline and searches seeds
            server.start()
            return {"pid": server.process.pid}

        report.section(("server", "start"), start, required=True)
        if server.process is not None:
            _measure(report, server, args, weights, started)
    finally:
        code = server.stop()
        report.data["server"]["exit_code"] = code
        log(f"tritonserver stopped (exit code {code})")
    summarize(report.data)
    return report.finish()


def _measure(report: Report, server, args, weights: Path, started: float) -> None:
    """In-process pipeline and seed searches (while the server loads), then the two measurements."""
    from minigpt5.pipeline import MiniGPT5Pipeline

    grpc_url, http_url = report.data["server"]["grpc"], report.data["server"]["http"]
    log_path = Path(report.data["server"]["log"])
    ctx: dict = {}

    def load():
        begin = time.perf_counter()
        ctx["pipeline"] = MiniGPT5Pipeline(weights, device=args.device)
        return {"seconds": round(time.perf_counter() - begin, 2), "device": ctx["pipeline"].device}

    report.section(("in_process_build",), load, required=True)
    if "pipeline" in ctx:
        pipeline = ctx["pipeline"]
        report.section(("seeds", "force_image"), lambda: seed_search(pipeline, args, kind="force_image"), required=True)
        report.section(("seeds", "overlap"), lambda: seed_search(pipeline, args, kind="overlap"), required=True)

    def ready():
        try:
            server.wait_ready(timeout=STARTUP_TIMEOUT_S)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n{_log_tail(log_path)}") from None
        return {"startup_s": round(time.perf_counter() - started, 1)}

    report.section(("server", "ready"), ready, required=True)
    seeds = report.data.get("seeds", {})
    if "pipeline" in ctx and "startup_s" in report.data["server"]["ready"]:
        if "seed" in seeds.get("force_image", {}):
            report.section(
                ("latency",),
                lambda: measure_latency(ctx["pipeline"], grpc_url, args, seeds["force_image"]),
                required=True,
            )
        if "seed" in seeds.get("overlap", {}):
            report.section(
                ("overlap",),
                lambda: measure_overlap(ctx["pipeline"], grpc_url, http_url, args, seeds["overlap"]),
                required=True,
            )
        if args.streams:
            report.section(
                ("streaming",),
                lambda: streaming.measure_throughput(ctx["pipeline"], server, grpc_url, args, PROMPT),
                required=True,
            )
        if args.short_requests:
            report.section(("short_ttft",), lambda: streaming.measure_short_ttft(grpc_url, args, PROMPT), required=True)


def measure_latency(pipeline, url: str, args, seed_info: dict) -> dict:
    seed = seed_info["seed"]
    served(url, args, seed, True)  # warm-up: first calls, handle creation, thread pools
    in_process(pipeline, args, seed, True)
    runs: dict[str, list[dict]] = {"served": [], "in_process": []}
    for i in range(args.requests):
        order = ("served", "in_process") if i % 2 == 0 else ("in_process", "served")
        for which in order:
            runs[which].append(
                served(url, args, seed, True) if which == "served" else in_process(pipeline, args, seed, True)
            )
        log(
            f"latency {i + 1}/{args.requests}: served {runs['served'][-1]['ms']:.0f} ms, "
            f"in-process {runs['in_process'][-1]['ms']:.0f} ms"
        )
    reference = runs["in_process"][0]
    served_runs = runs["served"]
    return {
        "seed": seed,
        "force_image": True,
        "image_token_index": seed_info["image_token_index"],
        "served_ms": stats.summarize([r["ms"] for r in served_runs]),
        "in_process_ms": stats.summarize([r["ms"] for r in runs["in_process"]]),
        "served_ttft_ms": median([r["ttft_ms"] for r in served_runs]),
        "served_image_start_ms": median([r["image_start_ms"] for r in served_runs]),
        "served_ttfi_ms": median([r["ttfi_ms"] for r in served_runs]),
        "same_text_as_in_process": all(r["text"] == reference["text"] for r in served_runs),
        "same_image_as_in_process": all(
            len(r["images"]) == len(reference["images"]) == 1 and np.array_equal(r["images"][0], reference["images"][0])
            for r in served_runs
        ),
    }


def measure_overlap(pipeline, url: str, http_url: str, args, seed_info: dict) -> dict:
    seed = seed_info["seed"]

    def sequential():
        decoded = decoder_only(pipeline, args, seed, False)
        image = image_only(http_url, decoded["voken_states"], seed, args)
        return {
            "decoder_ms": decoded["ms"],
            "vokens_ms": decoded["vokens_ms"],
            "image_ms": image["ms"],
            "text": decoded["text"],
            "image": image["image"],
        }

    served(url, args, seed, False)  # warm-up
    sequential()
    reference = in_process(pipeline, args, seed, False)
    overlapped, baseline, serial = [], [], []
    for i in range(args.requests):
        if i % 2 == 0:
            overlapped.append(served(url, args, seed, False))
            baseline.append(sequential())
        else:
            baseline.append(sequential())
            overlapped.append(served(url, args, seed, False))
        serial.append(in_process(pipeline, args, seed, False)["ms"])
        log(
            f"overlap {i + 1}/{args.requests}: served {overlapped[-1]['ms']:.0f} ms, sequential "
            f"{baseline[-1]['decoder_ms']:.0f} + {baseline[-1]['image_ms']:.0f} ms"
        )
    sequential_ms = [b["decoder_ms"] + b["image_ms"] for b in baseline]
    ideal_ms = [max(b["decoder_ms"], b["vokens_ms"] + b["image_ms"]) for b in baseline]
    served_ms = stats.summarize([r["ms"] for r in overlapped])
    return {
        "seed": seed,
        "force_image": False,
        "image_token_index": seed_info["image_token_index"],
        "tokens_after_image": seed_info["tokens_after_image"],
        "served_ms": served_ms,
        "decoder_only_ms": stats.summarize([b["decoder_ms"] for b in baseline]),
        "decoder_only_vokens_ms": median([b["vokens_ms"] for b in baseline]),
        "image_only_ms": stats.summarize([b["image_ms"] for b in baseline]),
        "sequential_ms": stats.summarize(sequential_ms),
        "ideal_overlapped_ms": stats.summarize(ideal_ms),
        "image_overlap_gain": ratio(statistics.median(sequential_ms), served_ms["ms"]),
        "ideal_gain": ratio(statistics.median(sequential_ms), statistics.median(ideal_ms)),
        "in_process_serial_ms": stats.summarize(serial),
        "served_ttft_ms": median([r["ttft_ms"] for r in overlapped]),
        "served_image_start_ms": median([r["image_start_ms"] for r in overlapped]),
        "served_ttfi_ms": median([r["ttfi_ms"] for r in overlapped]),
        "same_text_as_in_process": all(r["text"] == reference["text"] for r in overlapped)
        and all(b["text"] == reference["text"] for b in baseline),
        "same_image": all(
            len(r["images"]) == 1
            and np.array_equal(r["images"][0], b["image"])
            and np.array_equal(b["image"], reference["images"][0])
            for r, b in zip(overlapped, baseline)
        ),
    }


def summarize(data: dict) -> None:
    latency, overlap = data.get("latency") or {}, data.get("overlap") or {}
    served_ms = (latency.get("served_ms") or {}).get("ms")
    local_ms = (latency.get("in_process_ms") or {}).get("ms")
    data["summary"] = {
        "served_over_in_process_latency_ratio": ratio(served_ms, local_ms),
        "served_latency_ms": served_ms,
        "in_process_latency_ms": local_ms,
        "image_overlap_gain": overlap.get("image_overlap_gain"),
        "ideal_overlap_gain": overlap.get("ideal_gain"),
        "overlapped_ms": (overlap.get("served_ms") or {}).get("ms"),
        "sequential_ms": (overlap.get("sequential_ms") or {}).get("ms"),
        "time_to_first_token_ms": overlap.get("served_ttft_ms", latency.get("served_ttft_ms")),
        "time_to_first_image_ms": overlap.get("served_ttfi_ms"),
        "force_image_time_to_first_token_ms": latency.get("served_ttft_ms"),
        "force_image_time_to_first_image_ms": latency.get("served_ttfi_ms"),
    }
    levels = (data.get("streaming") or {}).get("levels") or {}
    data["summary"].update(
        {
            "served_over_engine_tokens_per_s": {n: level["served_over_engine"] for n, level in levels.items()},
            "served_tokens_per_s": {n: level["served"]["tokens_per_s"] for n, level in levels.items()},
            "engine_alone_tokens_per_s": {n: level["engine_alone"]["tokens_per_s"] for n, level in levels.items()},
            "short_ttft_p95_ratio": (data.get("short_ttft") or {}).get("short_ttft_p95_ratio"),
        }
    )
    data.update({k: data["summary"][k] for k in ("served_over_in_process_latency_ratio", "image_overlap_gain")})
    s = data["summary"]
    log(
        f"served / in-process: {s['served_latency_ms']} / {s['in_process_latency_ms']} ms = "
        f"{s['served_over_in_process_latency_ratio']}; overlap: sequential {s['sequential_ms']} / overlapped "
        f"{s['overlapped_ms']} ms = {s['image_overlap_gain']} (ideal {s['ideal_overlap_gain']}); "
        f"TTFT {s['time_to_first_token_ms']} ms, TTFI {s['time_to_first_image_ms']} ms; served / engine alone "
        f"tokens/s by streams {s['served_over_engine_tokens_per_s']}; short TTFT p95 ratio {s['short_ttft_p95_ratio']}"
    )
