"""`minigpt5 serve`: the real tritonserver on `model_repository/`, in the foreground, with readiness
reports while the models load, the endpoints printed once ready, and a drain on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

from ..launcher.process import TritonProcess, check_weights
from ..launcher.repository import parse_parameter_flags, prepare_repository
from ..weights.tiny import resolve_weights

EXIT_STUB_DIED = 3  # exit code when the watchdog stopped the server because a model's stub process died


def serve_forever(args) -> int:
    try:
        parameters = parse_parameter_flags(getattr(args, "param", None) or [])
        if parameters:  # fail on an unknown model or key before loading anything
            with tempfile.TemporaryDirectory(prefix="minigpt5-check-") as scratch:
                prepare_repository(Path(scratch), parameters)
    except ValueError as exc:
        print(f"minigpt5 serve: {exc}", file=sys.stderr)
        return 2
    weights = resolve_weights(args.weights)
    try:
        check_weights(weights)
    except (OSError, ValueError) as exc:
        print(f"minigpt5 serve: weights {weights}: {exc}", file=sys.stderr)
        return 2
    server = TritonProcess(
        weights,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        device=args.device,
        workdir=args.workdir,
        log_verbose=args.log_verbose,
        extra_args=args.tritonserver_args,
        parameters=parameters,
        admin_key=getattr(args, "admin_key", None),
    )
    print(f"minigpt5: starting tritonserver on weights {weights}", file=sys.stderr, flush=True)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        server.wait_ready(getattr(args, "ready_timeout", None), report=_say)
        _print_endpoints(args)
        code = server.process.wait() if server.process else 1
        return EXIT_STUB_DIED if server.crash else code
    except KeyboardInterrupt:
        print(
            f"\nminigpt5: stopping tritonserver (requests in flight get up to {server.exit_timeout_s} s) ...",
            file=sys.stderr,
            flush=True,
        )
        return 0
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"minigpt5 serve: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        _second_signal_kills(server)
        exit_code = server.stop(report=_say)
        if stopping or exit_code is not None:
            print(f"minigpt5: tritonserver stopped (exit code {exit_code})", file=sys.stderr, flush=True)


def _second_signal_kills(server: TritonProcess) -> None:
    """While stop() waits for the requests in flight, another Ctrl-C or SIGTERM kills the server at once
    (instead of interrupting the wait and leaving tritonserver running in its own session)."""

    def kill_now(signum, _frame):
        print("minigpt5: killing tritonserver now", file=sys.stderr, flush=True)
        server.kill()

    signal.signal(signal.SIGTERM, kill_now)
    signal.signal(signal.SIGINT, kill_now)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_endpoints(args) -> None:
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"""
MiniGPT-5 is ready.
  HTTP     http://{host}:{args.http_port}   (/v2/models/minigpt5/generate, /generate_stream)
  gRPC     {host}:{args.grpc_port}          (streaming; `minigpt5 generate --url {host}:{args.grpc_port}`)
  metrics  http://{host}:{args.metrics_port}/metrics

Try it:
  curl -sN -X POST http://{host}:{args.http_port}/v2/models/minigpt5/generate_stream \\
       -d '{{"text_input": "Tell me a story about a cat.", "stream": true, "force_image": true, "max_tokens": 48}}'

Ctrl-C stops the server.""",
        flush=True,
    )
