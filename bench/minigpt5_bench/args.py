"""`minigpt5-bench ...` registration. No torch at import time: each handler imports its bench lazily.

To add a bench: write `_add_<name>(sub)` that creates its parser, declares its flags and sets
`_runs(module, function)` as its handler, then list it in `BENCHES`. A handler returns an exit
code and prints exactly one JSON object to stdout (progress and logs go to stderr).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from .flags import add_dtype, add_skip, add_threads, add_weights, int_list


def add_bench_commands(subparsers) -> None:
    """Register every bench on the given subparsers (called by __main__.py)."""
    for add in BENCHES:
        add(subparsers)


# ---- flags shared by the model benches --------------------------------------------------------------
def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        help="also write the JSON here (rewritten after every section, so a killed run still leaves what it measured)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the JSON result to stdout (always on; accepted for the documented form)",
    )


def _runs(module: str, function: str):
    """A handler that imports the bench `module` only when its command runs (no torch at registration)."""

    def handler(args):
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(args)

    return handler


def _add_model_flags(p: argparse.ArgumentParser, *, default_preset: str) -> None:
    p.add_argument(
        "--preset",
        choices=["tiny", "full"],
        default=default_preset,
        help="architecture: full = real MiniGPT-5 dims (~9.5 B params), tiny = seconds on a CPU",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    add_dtype(p, "--dtype", "vision tower + LLM")
    add_dtype(p, "--image-dtype", "mapper + UNet + VAE", gpu_default="fp16")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    p.add_argument("--prefill-tokens", type=int, default=300, help="prompt positions for prefill (~300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    _add_output_flags(p)


def _add_stages(sub) -> None:
    p = sub.add_parser(
        "stages",
        help="per-stage latency of the real architecture with random weights",
        description="Build the five modules with random weights directly on --device and "
        "time each stage once per call: vision (batch 1), prefill, decode per "
        "token (batch 1, direct cached forward), mapper, one UNet step with CFG, "
        "VAE decode. Prints one JSON object.",
    )
    _add_model_flags(p, default_preset="tiny")

    p.set_defaults(handler=_runs("stage_latency", "main"))


def _add_e2e(sub) -> None:
    p = sub.add_parser(
        "e2e",
        help="stage latencies at several batch sizes, engine decode, end to end, naive baseline",
        description="The whole performance picture in one run: stages at batch 1/8 (vision) and 1/4 (UNet), engine "
        "decode ms/token at batch 1/8/32 with its HBM floor, end to end "
        "'one image + prompt in, 512 tokens + one image out' through the "
        "repository's stages (PNDM 50 and DPM-Solver++ 20), and the naive "
        "upstream-style path (HF generate + diffusers StableDiffusionPipeline) "
        "in the same run; then the same with fp8 LLM weights. Prints one JSON "
        "object.",
    )
    _add_model_flags(p, default_preset="full")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens generated end to end (image forced)")
    p.add_argument("--steps", type=int, default=50, help="PNDM steps end to end and in the naive baseline")
    p.add_argument("--dpm-steps", type=int, default=20, help="DPM-Solver++ steps of the fast end-to-end option")
    p.add_argument("--vision-batches", type=int_list, default=[1, 8], help="vision encoder batch sizes")
    p.add_argument("--unet-batches", type=int_list, default=[1, 4], help="images per UNet step (CFG doubles)")
    p.add_argument("--decode-batches", type=int_list, default=[1, 8, 32], help="engine decode batch sizes")
    p.add_argument("--decode-steps", type=int, default=32, help="timed engine steps per decode batch size")
    p.add_argument(
        "--hbm-gbps",
        type=float,
        help="memory bandwidth for the decode floor, GB/s (default: datasheet value of the GPU "
        "when known, e.g. H100 SXM 3350; none on CPU)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="wall-clock budget: sections that would overrun it are skipped ('skipped': 'budget')",
    )
    p.add_argument(
        "--decode-graphs",
        choices=["auto", "on", "off"],
        default="auto",
        help="1-token decode steps at static shapes, captured as CUDA graphs (the server's "
        "decode_cuda_graphs; auto: on a GPU; 'on' on the CPU runs the static shapes "
        "eagerly). When on, each decode batch is also timed eagerly in the same run",
    )
    p.add_argument(
        "--fp8",
        choices=["auto", "on", "off"],
        default="auto",
        help="finally quantise the LLM's layer weights to fp8 and time decode and end to end "
        "again (section fp8; auto: where torch supports fp8 matmuls: H100, CPU)",
    )
    add_skip(p, "stages, decode, e2e, naive, e2e_dpm, fp8")

    p.set_defaults(handler=_runs("e2e", "main"))


def _add_batching(sub) -> None:
    p = sub.add_parser(
        "batching",
        help="continuous batching vs the run-to-completion baseline",
        description="In-process, no Triton: the real DecodeEngine over the tiny weights (or "
        "--weights), continuous batching and DecodeEngine(run_to_completion=True) "
        "measured in the same run: tokens/s at each --concurrency (requests "
        "submitted together), the gain at 8 over 1, and the p95 time to first "
        "token of short requests arriving while 4 long ones run, over the same "
        "requests alone. Prints one JSON object.",
    )
    p.add_argument(
        "--preset",
        choices=["tiny", "full"],
        default="tiny",
        help="tiny: the built-in tiny weights; full: a random full-size LLM built on --device "
        "(both ignored with --weights)",
    )
    add_weights(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_dtype(p, "--dtype", "LLM")
    p.add_argument(
        "--concurrency",
        type=int_list,
        default=[1, 4, 8, 16],
        help="requests submitted together, one throughput run each (1 is always added)",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request in the throughput runs")
    p.add_argument("--long-tokens", type=int, default=256, help="tokens of each of the 4 long requests")
    p.add_argument("--short-tokens", type=int, default=16, help="tokens of each short request")
    p.add_argument(
        "--short-requests", type=int, default=8, help="short requests arriving while the long ones run (per repeat)"
    )
    p.add_argument("--repeats", type=int, default=5, help="repeats of every run (medians; p95 over all samples)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (0 = greedy); top-p 0.9 and repetition penalty 2 as served",
    )
    add_threads(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random full-preset LLM")
    _add_output_flags(p)

    p.set_defaults(handler=_runs("batching", "main"))


def _add_serving(sub) -> None:
    p = sub.add_parser(
        "serving",
        help="served vs in-process latency, image-overlap gain, streamed tokens/s vs the engine alone",
        description="Start the real tritonserver (free ports, the built-in tiny weights by "
        "default) and measure, for lone requests with fixed seeds: served (gRPC "
        "streaming) over in-process (MiniGPT5Pipeline) end-to-end latency of a "
        "force_image request, the gain of decoding the image while the text goes "
        "on (the decoder alone in process + image_decoder alone through Triton, "
        "over the served end to end), the served time to first token and image, streamed "
        "tokens/s at several concurrent text streams next to the engine alone (and "
        "the CPU seconds of every process per 1,000 tokens), and the TTFT of short "
        "requests under 4 long ones. The server is always stopped at the end. Prints "
        "one JSON object.",
    )
    add_weights(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: the server's models and the pipeline")
    p.add_argument("--requests", type=int, default=5, help="timed runs of each measurement (medians)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of both requests (vokens included)")
    p.add_argument("--steps", type=int, default=15, help="num_inference_steps (PNDM) of the images")
    p.add_argument("--seed", type=int, default=0, help="first seed of the searches for the two requests")
    p.add_argument(
        "--search-seeds",
        type=int,
        default=2000,
        help="seeds tried at most for each request (the overlap one needs [IMG0] sampled early)",
    )
    p.add_argument(
        "--streams",
        default="1,8,32",
        help="concurrent text streams of the throughput section, comma-separated ('' skips it)",
    )
    p.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of each throughput request")
    p.add_argument("--stream-rounds", type=int, default=3, help="requests each stream sends, one after another")
    p.add_argument(
        "--stream-repeats",
        type=int,
        default=3,
        help="served and engine-alone runs per level, alternating; the best of each is compared",
    )
    p.add_argument(
        "--short-requests",
        type=int,
        default=8,
        help="short requests of the TTFT section, alone and under 4 long ones (0 skips it)",
    )
    p.add_argument("--short-tokens", type=int, default=16, help="max_tokens of the short requests")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of every served model (their cpu_threads) and of this process (the "
        "in-process pipeline and engine), the same on both sides; 0 = torch's default",
    )
    p.add_argument(
        "--long-tokens",
        type=int,
        default=900,
        help="max_tokens of the 4 long requests (greedy, so that they run to the end)",
    )
    _add_output_flags(p)

    p.set_defaults(handler=_runs("serving_cost", "main"))


def _add_reliability(sub) -> None:
    p = sub.add_parser(
        "reliability",
        help="bad inputs, overload, timeouts, disconnects, crashes, soak",
        description="Start real tritonservers of its own (free ports, the built-in tiny weights by "
        "default) and probe what they do with bad inputs, overload, request timeouts, "
        "client disconnects, kill -9 of a model's stub and a steady soak; the HTTP "
        "body limits on a one-model repository. Prints one JSON object whose "
        "`summary` holds the counts (docs/RELIABILITY.md).",
    )
    from .reliability.command import add_arguments  # no torch at import time

    add_arguments(p)
    _add_output_flags(p)
    p.set_defaults(handler=_runs("reliability.command", "run"))


def _add_gateway(sub) -> None:
    p = sub.add_parser(
        "gateway",
        help="the OpenAI-compatible gateway vs direct gRPC: latency and tokens/s",
        description="Start `minigpt5 gateway` (its own process) over a Triton server (--url, or one "
        "the bench starts on the tiny weights) and measure, in one run and interleaved, "
        "the same requests through the gateway (SSE) and directly (the thin client's "
        "asyncio gRPC): a lone request's end-to-end latency (ratio, target <= 1.05) and "
        "tokens/s with --streams requests at once (ratio, target >= 0.95). Prints one "
        "JSON object.",
    )
    p.add_argument("--url", metavar="HOST:PORT", help="gRPC address of a running server (default: start one)")
    add_weights(p, "weights of the started server")
    p.add_argument("--device", default="cpu", help="device of the started server: cpu, cuda or auto")
    p.add_argument("--requests", type=int, default=20, help="lone requests each way (medians)")
    p.add_argument("--rounds", type=int, default=8, help="rounds of concurrent streams each way (medians)")
    p.add_argument("--streams", type=int, default=16, help="requests at once in each round")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of the lone request (an image forced)")
    p.add_argument("--stream-tokens", type=int, default=128, help="max_tokens of each concurrent request (text only)")
    p.add_argument("--steps", type=int, default=2, help="num_inference_steps of the lone request's image")
    p.add_argument("--seed", type=int, default=1, help="seed of the lone request; the streams use seed, seed+1, ...")
    _add_output_flags(p)

    p.set_defaults(handler=_runs("gateway", "main"))


def _add_cache(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="image-embedding and prefix caches, on and off in one run",
        description="In-process, no Triton: the vision stage and the real DecodeEngine over the "
        "tiny weights (or --weights), with the embedding cache and the prefix cache "
        "(cache) and without (no_cache), alternating, caches emptied every repeat: "
        "a chat of --turns turns with one new image per turn (TTFT, prefill positions "
        "and vision images per turn) and --concurrency requests sharing the system "
        "prompt (prefill positions per request, tokens/s); tokens compared. Then the "
        "chat through two real tritonservers, caches on and off (section served). "
        "Prints one JSON object.",
    )
    add_weights(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_dtype(p, "--dtype", "vision tower and LLM")
    p.add_argument("--turns", type=int, default=5, help="human turns of the chat, one new image each")
    p.add_argument("--concurrency", type=int, default=16, help="requests sharing the system prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every answer")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, seeded (0 = greedy)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each workload on each path (medians)")
    p.add_argument("--block-tokens", type=int, default=16, help="positions per prefix-cache block")
    p.add_argument("--prefix-cache-tokens", type=int, default=8192, help="prefix cache size in positions")
    p.add_argument("--embedding-cache-mb", type=int, default=256, help="embedding cache size in MiB")
    add_threads(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the pictures and of the sampling")
    add_skip(p, "chat, shared, served (the last starts two tritonservers)")
    _add_output_flags(p)

    p.set_defaults(handler=_runs("cache", "main"))


BENCHES = [_add_stages, _add_e2e, _add_batching, _add_serving, _add_reliability, _add_gateway, _add_cache]
