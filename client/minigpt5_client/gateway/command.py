"""`minigpt5 gateway`: the OpenAI-compatible HTTP API in front of a Triton server. Standard library
only at import time: the web stack (the `gateway` extra) loads when the command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..preprocess import PREPROCESS_MODES
from .settings import API_KEYS_ENV, DEFAULT_MAX_BODY_BYTES, DEFAULT_MODEL_NAME, DEFAULT_TIMEOUT_S

OPEN_WARNING = """\
!!! WARNING: no API keys are configured: anyone who can reach {where} can use this gateway
!!! (and the server behind it). Set ${env} (comma-separated) or --api-key-file to require
!!! `Authorization: Bearer KEY`.
"""


def add_gateway_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gateway",
        help="OpenAI-compatible HTTP API (/v1/chat/completions) in front of a Triton server",
        description="Serve /v1/models and /v1/chat/completions (streamed or not) over the Triton server's gRPC "
        "port: images in as data: URLs, images out as `images` entries or inline Markdown, "
        "OpenAI-shaped errors (400, 401, 503 + Retry-After, 504), an optional hand-off to a "
        "second OpenAI-compatible model. Needs the `gateway` extra (pip install '.[gateway]'). "
        "See docs/GATEWAY.md.",
    )
    p.add_argument(
        "--url",
        default="localhost:8001",
        metavar="HOST:PORT",
        help="the Triton server's gRPC address (default localhost:8001)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--api-key-file",
        type=Path,
        metavar="PATH",
        help=f"file of accepted API keys, one per line (added to ${API_KEYS_ENV}, comma-separated); "
        "with neither, the gateway is open to anyone and says so at start",
    )
    p.add_argument(
        "--model-name",
        default=DEFAULT_MODEL_NAME,
        help=f"the model name clients ask for (default {DEFAULT_MODEL_NAME}); hand-off models are "
        "listed as NAME+TARGET",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"limit for each answer from Triton; past it the client gets 504 (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin allowed to call the API from a browser, e.g. https://app.example.com "
        "(repeatable; default: none)",
    )
    p.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch http(s) image URLs from this host (repeatable; *.example.com for subdomains; "
        "redirects are not followed). Default: none, images must come as data: URLs",
    )
    p.add_argument(
        "--max-body-mib",
        type=float,
        default=DEFAULT_MAX_BODY_BYTES / 2**20,
        metavar="MIB",
        help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES // 2**20})",
    )
    p.add_argument(
        "--inline-images",
        action="store_true",
        help="by default write images into the text as Markdown data-URL images (clients that show "
        "only text); a request's `inline_images` field overrides it",
    )
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="pad",
        help="default image pre-processing: pad to a white square (upstream demo) or centre-crop",
    )
    p.add_argument(
        "--handoff-config",
        type=Path,
        metavar="PATH",
        help="JSON file of hand-off models (base URL, model, key variable, prices), routing rules "
        "and MiniGPT-5's price (docs/GATEWAY.md, 'Hand-off')",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        import uvicorn

        from .app import create_app
    except ImportError as error:
        print(f"error: the gateway needs its extra: pip install 'minigpt5-triton[gateway]' ({error})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not settings.api_keys:
        print(OPEN_WARNING.format(where=f"{args.host}:{args.port}", env=API_KEYS_ENV), file=sys.stderr, end="")
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30
    )
    return 0


def settings_from_args(args: argparse.Namespace):
    """GatewaySettings from the flags, the key variable and files (OSError/ValueError naming the problem)."""
    from ..client import server_address
    from .handoff_config import HandoffConfig, load_handoff_config
    from .settings import GatewaySettings, load_api_keys

    if args.max_body_mib <= 0 or args.timeout <= 0:
        raise ValueError("--max-body-mib and --timeout must be positive")
    return GatewaySettings(
        triton_url=server_address(args.url, "grpc"),
        api_keys=load_api_keys(args.api_key_file),
        model_name=args.model_name,
        timeout_s=args.timeout,
        cors_origins=tuple(args.cors_origin),
        image_hosts=tuple(args.allow_image_host),
        max_body_bytes=int(args.max_body_mib * 2**20),
        inline_images=args.inline_images,
        preprocess=args.preprocess,
        handoff=load_handoff_config(args.handoff_config) if args.handoff_config else HandoffConfig(),
    )
