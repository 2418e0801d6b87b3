"""`minigpt5` command line. Subcommands import their heavy modules lazily, so the client commands
(`generate`, `chat`) work in an install with only the base (client) dependencies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minigpt5",
        description="Serve MiniGPT-5 (interleaved text and image generation) on NVIDIA Triton Inference Server.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_run(commands)
    _add_weights(commands)
    from minigpt5_client.cli import add_client_commands

    add_client_commands(commands)
    args = parser.parse_args(argv)
    return args.handler(args) or 0


def _weights_help() -> str:
    return "weights directory (manifest.json + safetensors); default: the built-in tiny weights, built on first use"


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="run Triton Inference Server with the MiniGPT-5 model repository",
        description="Start the real tritonserver on the model repository, wait until it is "
        "ready, print the endpoints; Ctrl-C or SIGTERM stops it cleanly. "
        "Arguments after `--` go to tritonserver unchanged.",
    )
    p.add_argument("--weights", type=Path, help=_weights_help())
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--workdir", type=Path, help="where to write the prepared repository (default: a temp dir)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up (exit code 1) if the models are not all loaded after this long (default: no "
        "deadline; loading the real weights takes minutes, a line every 30 s says what is "
        "still loading)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="MODEL.KEY=VALUE",
        help="override a config.pbtxt parameter of a model, e.g. minigpt5.max_inflight_requests=8 or "
        "minigpt5.request_timeout_s=120 (repeatable; served from a copy of the repository, see "
        "docs/LIMITS.md); an unknown model or key is an error",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        help="value of the `minigpt5-admin-key` header that unlocks the model-repository, "
        "shared-memory, trace and logging APIs (default: $MINIGPT5_ADMIN_KEY; prefer the "
        "variable, a flag shows in `ps`). Without a key those APIs are refused to everyone",
    )
    p.add_argument("tritonserver_args", nargs="*", help="extra tritonserver flags, after --")

    def handler(args):
        from .commands.serve import serve_forever

        return serve_forever(args)

    p.set_defaults(handler=handler)


def _add_run(commands) -> None:
    p = commands.add_parser(
        "run",
        help="generate in-process (no server): text streams, images are written",
        description="Run the whole model in this process and write the interleaved result "
        "as Markdown + PNGs and JSON into --out.",
    )
    p.add_argument("--weights", type=Path, help=_weights_help())
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="input image path or URL (repeatable, in order)")
    p.add_argument("--crop", action="store_true", help="centre-crop input images instead of padding them to a square")
    p.add_argument(
        "--force-image", action="store_true", help="make sure the answer contains --max-images images (default one)"
    )
    p.add_argument(
        "--force-image-mode",
        choices=["first", "end"],
        help="where a forced image goes: first (before the text, upstream's default) or end",
    )
    p.add_argument("--max-images", type=int, help="images per answer (default 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--steps", type=int, dest="num_inference_steps")
    p.add_argument("--scheduler", choices=["pndm", "dpm"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (LLM side)")
    p.add_argument(
        "--vision-dtype",
        default="auto",
        help="auto (fp16 on a GPU, as upstream runs the ViT; fp32 on a CPU), fp32, bf16 or fp16",
    )
    p.add_argument(
        "--image-dtype",
        default="auto",
        help="auto (fp16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16 (mapper, UNet, VAE; bf16 is "
        "the fast one on a CPU with AVX512-BF16 or AMX)",
    )
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory (default: ./out)")

    def handler(args):
        from .commands.run import run

        return run(args)

    p.set_defaults(handler=handler)


def _add_weights(commands) -> None:
    p = commands.add_parser("weights", help="build tiny or random weights, or convert upstream checkpoints")
    sub = p.add_subparsers(dest="weights_command", required=True, metavar="WHAT")
    tiny = sub.add_parser("tiny", help="build tiny random weights in the real layout (offline, seconds)")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0, help="same seed => identical tensors")

    def build_tiny(args):
        from .weights.tiny import build_tiny_weights

        print(build_tiny_weights(args.out, args.seed))

    tiny.set_defaults(handler=build_tiny)

    random = sub.add_parser(
        "random",
        help="build random weights at real size (full) or real widths (slim)",
        description="Random weights in the real layout, built and written one module at a "
        "time (peak memory: the largest module, the LLM). full: the real "
        "MiniGPT-5 (~17.8 GB in bf16); slim: the real widths with the fewest "
        "layers that run every code path (~2 GB in bf16).",
    )
    random.add_argument("--preset", choices=["full", "slim"], required=True)
    random.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="stored dtype (default bf16)")
    random.add_argument("--out", type=Path, required=True)
    random.add_argument("--seed", type=int, default=0, help="same seed => identical tensors")

    def build_random(args):
        from .weights.random_weights import build_random_weights

        print(build_random_weights(args.out, args.preset, args.dtype, args.seed, progress=True))

    random.set_defaults(handler=build_random)

    convert = sub.add_parser("convert", help="convert upstream MiniGPT-5 / Vicuna / BLIP-2 / SD files to the layout")
    from .weights.convert_args import add_convert_arguments

    add_convert_arguments(convert)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
