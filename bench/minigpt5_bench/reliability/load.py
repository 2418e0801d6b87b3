"""Load: closed loops at and over the in-flight limit, bursts, a request longer than
request_timeout_s, and the soak."""

from __future__ import annotations

import collections
import json
import threading
import time

import numpy as np

from ..stats import percentile, rounded
from .measure import metric, rss_bytes, scrape
from .wire import OVERTIME, SHORT, STEADY, Outcome, generate_path, grpc_request, grpc_tensors, http_request


def closed_loop(
    url: str,
    *,
    clients: int,
    duration_s: float,
    params: dict,
    backoff_s: float = 0.1,
    timeout: float = 120.0,
    alive=lambda: True,
) -> list[Outcome]:
    """`clients` threads sending `params` back to back for `duration_s` (or until `alive()` turns
    false); a refused client waits `backoff_s` before it retries (as a real client would)."""
    results: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(index: int) -> None:
        start.wait()
        end = time.monotonic() + duration_s
        n = 0
        while time.monotonic() < end and alive():
            outcome = grpc_request(url, grpc_tensors({**params, "random_seed": 1000 * index + n}), timeout=timeout)
            n += 1
            with lock:
                results.append(outcome)
            if outcome.status == "UNAVAILABLE":
                time.sleep(backoff_s)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + timeout + 30)
    return results


def _alive(server) -> bool:
    return server.process.process.poll() is None and server.process.crash is None


def _latency(outcomes_: list[Outcome]) -> dict:
    seconds = [o.seconds for o in outcomes_]
    return {
        "n": len(seconds),
        "p50_s": rounded(percentile(seconds, 50)),
        "p95_s": rounded(percentile(seconds, 95)),
        "max_s": rounded(max(seconds) if seconds else None),
    }


def burst(url: str, n: int, params: dict, seed: int = 0, timeout: float = 120.0) -> list[Outcome]:
    """`n` gRPC requests released at the same instant (a barrier), each on its own stream."""
    barrier = threading.Barrier(n)
    results: list[Outcome | None] = [None] * n

    def one(index: int) -> None:
        inputs = grpc_tensors({**params, "random_seed": seed + index})
        barrier.wait()
        results[index] = grpc_request(url, inputs, timeout=timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return [r for r in results if r is not None]


def probe_overload(
    server,
    *,
    limit: int,
    burst_size: int = 12,
    rounds: int = 3,
    params: dict | None = None,
    sustained_s: float = 0.0,
    clients: int = 12,
    backoff_s: float = 0.1,
) -> dict:
    """Admission control. `rounds` times: exactly `limit` requests at once (the unloaded-at-capacity
    latency), then `burst_size` at once: the excess must be refused at once with UNAVAILABLE and the
    admitted ones keep their latency (admitted p95 over at-limit p95, target <= 1.5). One HTTP burst
    shows how Triton 2.51's HTTP frontend reports the refusal. `sustained_s` > 0 adds a closed loop of
    `clients` clients retrying after `backoff_s` (a sustained overload)."""
    params = params or STEADY
    at_limit, loaded = [], []
    for r in range(rounds):
        at_limit += burst(server.grpc_url, limit, params, seed=1000 * r)
        loaded += burst(server.grpc_url, burst_size, params, seed=1000 * r + 100)
    admitted = [o for o in loaded if o.ok]
    rejected = [o for o in loaded if o.status == "UNAVAILABLE"]
    others = [o for o in loaded if not o.ok and o.status != "UNAVAILABLE"]
    base = _latency([o for o in at_limit if o.ok])
    admitted_latency = _latency(admitted)
    ratio = (
        None
        if not base["p95_s"] or admitted_latency["p95_s"] is None
        else round(admitted_latency["p95_s"] / base["p95_s"], 3)
    )
    rejection_ms = [o.seconds * 1000 for o in rejected]
    result = {
        "limit": limit,
        "burst": burst_size,
        "rounds": rounds,
        "params": {k: v for k, v in params.items() if k != "text_input"},
        "at_limit": {
            "requests": len(at_limit),
            "ok": sum(o.ok for o in at_limit),
            "failed": [o.brief() for o in at_limit if not o.ok][:3],
            **base,
        },
        "overloaded": {
            "requests": len(loaded),
            "admitted": len(admitted),
            "rejected": len(rejected),
            "other_errors": len(others),
            "other_error_samples": [o.brief() for o in others[:3]],
            "admitted_latency": admitted_latency,
            "rejection_ms": {
                "p50": rounded(percentile(rejection_ms, 50), 1),
                "p95": rounded(percentile(rejection_ms, 95), 1),
                "max": rounded(max(rejection_ms) if rejection_ms else None, 1),
            },
            "rejection_message": rejected[0].message if rejected else None,
        },
        "admitted_p95_over_at_limit_p95": ratio,
        "target_ratio": 1.5,
        "within_target": ratio is not None and ratio <= 1.5,
        "http_burst": _http_burst(server.http_url, burst_size, params),
        "inflight_after": metric(scrape(server.metrics_url), "minigpt5_inflight_requests"),
    }
    if sustained_s > 0:
        loop = closed_loop(
            server.grpc_url,
            clients=clients,
            duration_s=sustained_s,
            params=params,
            backoff_s=backoff_s,
            alive=lambda: _alive(server),
        )
        ok = [o for o in loop if o.ok]
        refused = [o for o in loop if o.status == "UNAVAILABLE" and "max_inflight_requests" in o.message]
        result["sustained"] = {
            "clients": clients,
            "seconds": sustained_s,
            "backoff_s": backoff_s,
            "requests": len(loop),
            "ok": len(ok),
            "refused": len(refused),
            "other": len(loop) - len(ok) - len(refused),
            "other_samples": [o.brief() for o in loop if not o.ok and o not in refused][:3],
            "ok_latency": _latency(ok),
            "server_alive": server.process.process.poll() is None,
            "watchdog": server.process.crash,
        }
    return result


def _http_burst(url: str, clients: int, params: dict) -> dict:
    """`clients` /generate requests at once: how Triton 2.51's HTTP frontend reports the refusals."""
    barrier = threading.Barrier(clients)
    results: list[Outcome] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        barrier.wait()
        outcome = http_request(url, generate_path(False), json.dumps({**params, "random_seed": index}).encode())
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    refused = [o for o in results if "max_inflight_requests" in o.message]
    return {
        "requests": len(results),
        "ok": sum(o.ok for o in results),
        "refused": len(refused),
        "refused_status": dict(collections.Counter(o.status for o in refused)),
        "other": [o.brief() for o in results if not o.ok and o not in refused][:3],
        "refusal_max_ms": rounded(max((o.seconds * 1000 for o in refused), default=None), 1),
    }


# ---- request timeout --------------------------------------------------------------------------------
def probe_timeout(server, timeout_s: float, params: dict | None = None) -> dict:
    """A request longer than request_timeout_s ends UNAVAILABLE (gRPC) naming the parameter."""
    params = params or OVERTIME
    grpc_outcome = grpc_request(server.grpc_url, grpc_tensors({**params, "stream": True}), timeout=timeout_s + 120)
    http_outcome = http_request(
        server.http_url, generate_path(False), json.dumps(params).encode(), timeout=timeout_s + 120
    )
    return {
        "request_timeout_s": timeout_s,
        "grpc": {
            **grpc_outcome.brief(),
            "events_before": grpc_outcome.events,
            "names_parameter": "request_timeout_s" in grpc_outcome.message,
        },
        "http": {**http_outcome.brief(), "names_parameter": "request_timeout_s" in http_outcome.message},
        "served_after": grpc_request(server.grpc_url, grpc_tensors(SHORT)).ok,
    }


# ---- soak -------------------------------------------------------------------------------------------
def soak_requests() -> list[tuple[str, dict]]:
    """The mix a soak cycles through: text over gRPC and SSE, an image, an input image."""
    pixels = np.random.RandomState(0).randint(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    return [
        ("grpc_text", {"text_input": "Tell me a story.", "max_tokens": 24}),
        ("sse_text", {"text_input": "Tell me a story.", "max_tokens": 24, "stream": True}),
        (
            "grpc_image",
            {
                "text_input": "Draw a cat.",
                "max_tokens": 12,
                "force_image": True,
                "num_inference_steps": 3,
                "scheduler": "dpm",
            },
        ),
        ("grpc_input_image", {"text_input": "What is this?", "max_tokens": 16, "images": pixels}),
    ]


def probe_soak(
    server, *, duration_s: float, clients: int, warmup_s: float, sample_every_s: float = 2.0, timeout: float = 120.0
) -> dict:
    """`clients` closed-loop clients for `duration_s`; RSS of tritonserver + stubs sampled throughout;
    growth = mean of the last 3 samples over the mean of the 3 samples at the end of the warm-up."""
    mix = soak_requests()
    failures: list[dict] = []
    counts: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        n = index
        while not stop.is_set() and _alive(server):
            kind, params = mix[n % len(mix)]
            params = {**params, "random_seed": n}
            if kind.startswith("sse"):
                outcome = http_request(
                    server.http_url, generate_path(True), json.dumps(params).encode(), timeout=timeout
                )
            else:
                outcome = grpc_request(server.grpc_url, grpc_tensors({**params, "stream": True}), timeout=timeout)
            n += clients
            with lock:
                counts[kind] += 1
                latencies.append(outcome.seconds)
                if not outcome.ok:
                    failures.append({"kind": kind, **outcome.brief()})

    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    died_after = None
    while time.monotonic() - started < duration_s:
        if not _alive(server):
            died_after = time.monotonic() - started
            break
        samples.append((time.monotonic() - started, rss_bytes(server)))
        time.sleep(sample_every_s)
    stop.set()
    for thread in threads:
        thread.join(timeout + 30)
    if _alive(server):
        samples.append((time.monotonic() - started, rss_bytes(server)))
    elif died_after is None:
        died_after = time.monotonic() - started
    warm = [rss for t, rss in samples if t >= warmup_s][:3]
    end = [rss for _, rss in samples[-3:]]
    growth = None if died_after is not None or not warm else float(np.mean(end)) / float(np.mean(warm)) - 1.0
    return {
        "duration_s": round(time.monotonic() - started, 1),
        "clients": clients,
        "warmup_s": warmup_s,
        "server_died_after_s": rounded(died_after, 1),
        "watchdog": server.process.crash,
        "requests": sum(counts.values()),
        "by_kind": dict(counts),
        "failures": len(failures),
        "failure_samples": failures[:5],
        "latency": {"p50_s": rounded(percentile(latencies, 50)), "p95_s": rounded(percentile(latencies, 95))},
        "rss_mb_after_warmup": round(float(np.mean(warm)) / 2**20, 1) if warm else None,
        "rss_mb_end": round(float(np.mean(end)) / 2**20, 1) if end else None,
        "rss_growth": None if growth is None else round(growth, 4),
        "rss_growth_limit": 0.05,
        "within_limit": growth is not None and growth < 0.05,
        "rss_mb_samples": [[round(t, 1), round(rss / 2**20, 1)] for t, rss in samples],
    }
