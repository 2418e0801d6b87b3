"""`minigpt5-bench gateway`: what the OpenAI-compatible gateway costs over calling Triton directly.

One run, the same requests both ways, interleaved (direct, gateway, gateway, direct, ...):
  lone      one request at a time, end to end (send -> last byte), text and a forced image:
            the thin client's AsyncClient over gRPC vs POST /v1/chat/completions (stream, SSE);
            ratio = median over the back-to-back pairs of gateway ms / direct ms (target <= 1.05).
  streams   --streams requests at once, text only, distinct seeds: completion tokens / wall time;
            ratio = median over the pairs of gateway tokens/s / direct tokens/s (target >= 0.95).
Both paths decode in the same bench process, so client-side parsing is in both. The gateway runs as
its own process (`minigpt5 gateway`), as deployed; with --url the Triton server is one already
running, else the bench starts one on the tiny weights and stops it at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from minigpt5.launcher.local import free_port

from .report import Report
from .stats import ratio
from .timing import log

PROMPT = "Tell me a story about a cat."
TARGETS = {"lone_latency_ratio_max": 1.05, "streams_tokens_per_s_ratio_min": 0.95}
STARTUP_TIMEOUT_S = 300.0


class GatewayProcess:
    """`python -m minigpt5_client gateway` on a free loopback port, as its own process."""

    def __init__(self, triton_url: str, *flags: str, env: dict | None = None, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="minigpt5-gateway-", suffix=".log")[1])
        command = [
            sys.executable,
            "-m",
            "minigpt5_client",
            "gateway",
            "--url",
            triton_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *flags,
        ]
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the gateway did not answer /health within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


# ---- one request each way ---------------------------------------------------------------------------
async def direct(client, params: dict) -> dict:
    """The thin client's asyncio gRPC stream: end-to-end ms, text, completion tokens."""
    from minigpt5_client import Final, TextDelta

    start, text, tokens = time.perf_counter(), [], None
    async for event in client.stream(PROMPT, **params):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Final):
            tokens = event.usage["completion_tokens"]
    return {"ms": (time.perf_counter() - start) * 1e3, "text": "".join(text), "tokens": tokens}


async def through_gateway(session, gateway_url: str, params: dict) -> dict:
    """POST /v1/chat/completions with stream=true, read to `data: [DONE]` (aiohttp: the lightest SSE
    reader at hand, so that the client's own parsing weighs about what the direct path's does)."""
    body = {
        "model": "minigpt5",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **params,
    }
    start, text, tokens = time.perf_counter(), [], None
    async with session.post(f"{gateway_url}/v1/chat/completions", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"gateway answered {reply.status}: {(await reply.read())[:500]!r}")
        async for line in reply.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"gateway stream error: {chunk['error']}")
            text += [choice["delta"].get("content", "") for choice in chunk["choices"]]
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return {"ms": (time.perf_counter() - start) * 1e3, "text": "".join(text), "tokens": tokens}


def http_session(connections: int):
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=STARTUP_TIMEOUT_S)
    )


# ---- the measurements -------------------------------------------------------------------------------
async def measure_lone(triton_url: str, gateway_url: str, args) -> dict:
    from minigpt5_client import AsyncClient

    params = {"max_tokens": args.max_tokens, "seed": args.seed, "force_image": True, "num_inference_steps": args.steps}
    runs: dict[str, list] = {"direct": [], "gateway": []}
    async with AsyncClient(triton_url) as client, http_session(4) as http:
        ways = {"direct": lambda: direct(client, params), "gateway": lambda: through_gateway(http, gateway_url, params)}
        for way in ways.values():  # warm-up: channels, connections, first-call costs
            await way()
        for i in range(args.requests):
            for name in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                runs[name].append(await ways[name]())
            log(
                f"lone {i + 1}/{args.requests}: direct {runs['direct'][-1]['ms']:.0f} ms, "
                f"gateway {runs['gateway'][-1]['ms']:.0f} ms"
            )
    direct_ms = [run["ms"] for run in runs["direct"]]
    gateway_ms = [run["ms"] for run in runs["gateway"]]
    return {
        "params": params,
        "direct_ms": _summary(direct_ms),
        "gateway_ms": _summary(gateway_ms),
        "latency_ratio": _paired_ratio(gateway_ms, direct_ms),
        "ratio_of_medians": ratio(statistics.median(gateway_ms), statistics.median(direct_ms)),
        "same_text": len({run["text"] for run in runs["direct"] + runs["gateway"]}) == 1,
    }


async def measure_streams(triton_url: str, gateway_url: str, args) -> dict:
    from minigpt5_client import AsyncClient

    def params(i: int) -> dict:
        return {"max_tokens": args.stream_tokens, "seed": args.seed + i}

    rates: dict[str, list] = {"direct": [], "gateway": []}
    tokens: dict[str, set] = {"direct": set(), "gateway": set()}
    async with AsyncClient(triton_url) as client, http_session(args.streams + 4) as http:
        ways = {
            "direct": lambda i: direct(client, params(i)),
            "gateway": lambda i: through_gateway(http, gateway_url, params(i)),
        }

        async def together(name: str) -> float:
            start = time.perf_counter()
            results = await asyncio.gather(*(ways[name](i) for i in range(args.streams)))
            count = sum(result["tokens"] for result in results)
            tokens[name].add(count)
            return count / (time.perf_counter() - start)

        for name in ways:  # warm-up
            await together(name)
        for i in range(args.rounds):
            for name in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                rates[name].append(await together(name))
            log(
                f"streams {i + 1}/{args.rounds}: direct {rates['direct'][-1]:.0f} tokens/s, "
                f"gateway {rates['gateway'][-1]:.0f} tokens/s"
            )
    return {
        "streams": args.streams,
        "max_tokens": args.stream_tokens,
        "direct_tokens_per_s": _rates(rates["direct"]),
        "gateway_tokens_per_s": _rates(rates["gateway"]),
        "tokens_per_s_ratio": _paired_ratio(rates["gateway"], rates["direct"]),
        "ratio_of_medians": ratio(statistics.median(rates["gateway"]), statistics.median(rates["direct"])),
        "same_tokens": len(tokens["direct"] | tokens["gateway"]) == 1,
        "tokens_per_round": sorted(tokens["direct"] | tokens["gateway"]),
    }


def _summary(values: list[float]) -> dict:
    return {
        "ms": round(statistics.median(values), 2),
        "min_ms": round(min(values), 2),
        "max_ms": round(max(values), 2),
        "n": len(values),
    }


def _rates(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "n": len(values),
    }


def _paired_ratio(gateway: list[float], direct: list[float]) -> float | None:
    """Median of gateway/direct over the pairs measured back to back: the machine's load, which
    drifts over seconds, is then about the same for both halves of a pair."""
    ratios = [g / d for g, d in zip(gateway, direct, strict=True) if d > 0]
    return round(statistics.median(ratios), 3) if ratios else None


# ---- the run ----------------------------------------------------------------------------------------
def main(args) -> int:
    report = Report("gateway", out=args.out)
    report.data["settings"] = {
        key: getattr(args, key)
        for key in ("requests", "rounds", "streams", "max_tokens", "stream_tokens", "steps", "seed")
    }
    report.data["targets"] = TARGETS
    server = None
    try:
        triton_url = args.url
        if triton_url is None:
            server = _start_server(report, args)
            triton_url = report.data["server"]["grpc"]
        gateway = GatewayProcess(triton_url, "--log-level", "warning")
        try:
            report.section(("gateway",), lambda: _ready(gateway), required=True)
            if "error" not in report.data["gateway"]:
                report.section(("lone",), lambda: asyncio.run(measure_lone(triton_url, gateway.url, args)))
                report.section(("streams",), lambda: asyncio.run(measure_streams(triton_url, gateway.url, args)))
        finally:
            report.data["gateway"]["exit_code"] = gateway.stop()
    finally:
        if server is not None:
            report.data["server"]["exit_code"] = server.stop()
    _summarize(report.data)
    return report.finish()


def _ready(gateway: GatewayProcess) -> dict:
    started = time.perf_counter()
    gateway.wait_ready()
    return {"url": gateway.url, "startup_s": round(time.perf_counter() - started, 2), "log": str(gateway.log_path)}


def _start_server(report: Report, args):
    from minigpt5.launcher.local import local_process
    from minigpt5.weights.tiny import resolve_weights

    server = local_process(resolve_weights(args.weights), device=args.device, name="bench-gateway")
    report.data["server"] = {"grpc": server.grpc_url, "log": str(server.log_file)}

    def start():
        started = time.perf_counter()
        server.start()
        server.wait_ready(timeout=STARTUP_TIMEOUT_S)
        return {"startup_s": round(time.perf_counter() - started, 1)}

    report.section(("server", "ready"), start, required=True)
    return server


def _summarize(data: dict) -> None:
    lone, streams = data.get("lone") or {}, data.get("streams") or {}
    latency, throughput = lone.get("latency_ratio"), streams.get("tokens_per_s_ratio")
    data["summary"] = {
        "lone_latency_ratio": latency,
        "streams_tokens_per_s_ratio": throughput,
        "lone_direct_ms": (lone.get("direct_ms") or {}).get("ms"),
        "lone_gateway_ms": (lone.get("gateway_ms") or {}).get("ms"),
        "streams_direct_tokens_per_s": (streams.get("direct_tokens_per_s") or {}).get("median"),
        "streams_gateway_tokens_per_s": (streams.get("gateway_tokens_per_s") or {}).get("median"),
        "targets_met": {
            "lone_latency_ratio": None if latency is None else latency <= TARGETS["lone_latency_ratio_max"],
            "streams_tokens_per_s_ratio": None
            if throughput is None
            else throughput >= TARGETS["streams_tokens_per_s_ratio_min"],
        },
    }
    log(f"gateway / direct: lone latency {latency}, tokens/s at {streams.get('streams')} streams {throughput}")
