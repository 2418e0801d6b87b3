"""Custom metrics on the real server's /metrics after real requests, and the deployment files'
PromQL (dashboard, alerts, adapter, and the HPAs through the adapter) only naming metrics that
really exist there (GPU-only `nv_*` families excepted on CPU). Under a short load on a decoder with
one row, the waiting / running / KV gauges move and come back to 0, and the histograms count each
request (or image) once."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from support.deploy_metrics import (
    TRITON_251_METRICS,
    documented_metrics,
    exposition_series_names,
    referenced_metric_names,
)
from support.servers import start_server
from support.serving_helpers import assemble, grpc_stream

pytestmark = pytest.mark.server

# Triton exports these only with a GPU (nv_gpu_*, nv_energy_*) or a DCGM-enabled build.
GPU_ONLY = re.compile(r"^nv_(gpu_|energy_)")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, series: str, **labels) -> float:
    """Sum of the samples of `series` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(series + "{") and not line.startswith(series + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{series} {labels} not on /metrics"
    return total


@pytest.fixture(scope="module")
def scraped(triton_server):
    result = assemble(
        grpc_stream(
            triton_server.grpc_url,
            {"text_input": "A picture, please.", "force_image": True, "max_tokens": 20, "random_seed": 3},
        )
    )
    assert len(result["images"]) == 1
    return _scrape(triton_server.metrics_url)


def test_every_documented_metric_is_exported(scraped):
    names = exposition_series_names(scraped)
    for family, kind in documented_metrics().items():
        expected = family + "_count" if kind == "histogram" else family
        assert expected in names, f"{family} ({kind}) missing from /metrics"


def test_custom_metric_values_are_sane(scraped):
    model = {"model": "minigpt5"}
    assert _value(scraped, "minigpt5_generated_tokens_total", **model) > 0
    assert _value(scraped, "minigpt5_vokens_total", **model) >= 8
    assert _value(scraped, "minigpt5_images_total", **model) >= 1
    assert _value(scraped, "minigpt5_requests_total", outcome="ok", **model) >= 1
    assert _value(scraped, "minigpt5_inflight_requests", **model) == 0  # nothing running now
    for histogram in ("minigpt5_time_to_first_token_seconds", "minigpt5_time_to_first_image_seconds"):
        assert _value(scraped, histogram + "_count", **model) >= 1
        assert _value(scraped, histogram + "_sum", **model) > 0
    assert _value(scraped, "minigpt5_decoder_batch_size_count", model="vicuna_decoder") >= 1
    assert _value(scraped, "minigpt5_image_batch_size_count", model="image_decoder") >= 1
    decoder = {"model": "vicuna_decoder"}
    assert _value(scraped, "minigpt5_prefill_positions_total", **decoder) > 0
    assert _value(scraped, "minigpt5_prefix_cache_blocks", **decoder) > 0  # the prompt's whole blocks, kept
    assert _value(scraped, "minigpt5_prefix_cache_bytes", **decoder) > 0
    tokens = _value(scraped, "minigpt5_generated_tokens_total", **model)
    vokens = _value(scraped, "minigpt5_vokens_total", **model)
    images = _value(scraped, "minigpt5_images_total", **model)
    assert vokens == 8 * images and tokens >= 0


def test_deployment_files_reference_only_exported_metrics(scraped):
    exported = exposition_series_names(scraped)
    referenced = referenced_metric_names()
    missing = {name for name in referenced - exported if not (GPU_ONLY.match(name) and name in TRITON_251_METRICS)}
    assert not missing, f"dashboard/rules reference metrics the server does not export: {sorted(missing)}"


# ---- under load: one decoder row, so requests queue behind each other ---------------------------
# Greedy "A very long story." runs to its max_tokens on the tiny weights: while one holds the row,
# the others wait.
LONG = {"text_input": "A very long story.", "max_tokens": 900, "temperature": 0.0, "repetition_penalty": 1.0}
PICTURE = {"text_input": "What is in this picture? Draw one.", "max_tokens": 16, "force_image": True, "random_seed": 4}
DECODER = {"model": "vicuna_decoder"}
PUBLIC = {"model": "minigpt5"}
GAUGES = (
    "minigpt5_num_requests_waiting",
    "minigpt5_num_requests_running",
    "minigpt5_kv_cache_used_positions",
    "minigpt5_kv_cache_usage_ratio",
)
HISTOGRAMS = {  # histogram → the model label that owns it
    "minigpt5_e2e_request_latency_seconds": PUBLIC,
    "minigpt5_time_to_first_token_seconds": PUBLIC,
    "minigpt5_time_per_output_token_seconds": PUBLIC,
    "minigpt5_request_prompt_tokens": PUBLIC,
    "minigpt5_vision_latency_seconds": PUBLIC,
    "minigpt5_image_decode_latency_seconds": PUBLIC,
    "minigpt5_image_queue_wait_seconds": PUBLIC,
    "minigpt5_prefill_latency_seconds": DECODER,
}
ONCE_FOR_THE_PICTURE = (
    "minigpt5_vision_latency_seconds",
    "minigpt5_image_decode_latency_seconds",
    "minigpt5_image_queue_wait_seconds",
)
BOUND_S = 300  # upper bound for the load and for the metrics to settle, never a measurement


@pytest.fixture(scope="module")
def one_row_server(tiny_weights, tmp_path_factory):
    server = start_server(
        tiny_weights, tmp_path_factory.mktemp("one-row"), parameters={"vicuna_decoder": {"max_batch_rows": "1"}}
    )
    yield server
    server.process.stop()


def _counts(text: str) -> dict[str, float]:
    return {name: _value(text, name + "_count", **labels) for name, labels in HISTOGRAMS.items()}


def _settled(url: str, predicate) -> str:
    """The first scrape for which `predicate(text)` holds, within BOUND_S."""
    deadline = time.monotonic() + BOUND_S
    while True:
        text = _scrape(url)
        if predicate(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_decoder_gauges_and_latency_histograms_under_load(one_row_server):
    url = one_row_server.metrics_url
    before = _scrape(url)
    image = np.random.RandomState(5).randint(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    requests = [LONG, LONG, LONG, {**PICTURE, "images": image}]
    results: list = [None] * len(requests)

    def run(i: int) -> None:
        results[i] = assemble(grpc_stream(one_row_server.grpc_url, requests[i], timeout=BOUND_S))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    peak = dict.fromkeys(GAUGES, 0.0)
    while any(thread.is_alive() for thread in threads):
        text = _scrape(url)
        for gauge in GAUGES:
            peak[gauge] = max(peak[gauge], _value(text, gauge, **DECODER))
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert all(results), "a request failed"
    usages = [result["usage"] for result in results]
    assert [u["sampled_tokens"] for u in usages[:3]] == [900] * 3 and usages[3]["images"] == 1

    assert peak["minigpt5_num_requests_waiting"] > 0, peak  # three requests queued behind one row
    assert peak["minigpt5_num_requests_running"] == 1, peak  # max_batch_rows = 1
    assert 0 < peak["minigpt5_kv_cache_usage_ratio"] <= 1, peak
    assert peak["minigpt5_kv_cache_used_positions"] >= 900, peak  # a LONG request reserves its max_tokens

    # the decoder's last snapshot, taken when it fell idle, sets every gauge back to 0; the
    # histograms are recorded by the models' metrics threads, shortly after the answers
    grown = dict.fromkeys(HISTOGRAMS, len(requests))  # one per answer (or per prefill)
    grown.update({name: 1 for name in ONCE_FOR_THE_PICTURE})  # its one input image, its one image out
    grown["minigpt5_time_to_first_token_seconds"] = sum(bool(r["text"]) for r in results)
    grown["minigpt5_time_per_output_token_seconds"] = sum(u["sampled_tokens"] >= 2 for u in usages)
    expected = {name: count + grown[name] for name, count in _counts(before).items()}
    after = _settled(
        url, lambda text: all(_value(text, gauge, **DECODER) == 0 for gauge in GAUGES) and _counts(text) == expected
    )
    assert {gauge: _value(after, gauge, **DECODER) for gauge in GAUGES} == dict.fromkeys(GAUGES, 0.0)
    assert _counts(after) == expected
    prompt_sum = _value(after, "minigpt5_request_prompt_tokens_sum", **PUBLIC) - _value(
        before, "minigpt5_request_prompt_tokens_sum", **PUBLIC
    )
    assert prompt_sum == sum(u["prompt_tokens"] + u["image_tokens"] for u in usages)
    assert usages[3]["image_tokens"] == 32
    per_token = _value(after, "minigpt5_time_per_output_token_seconds_sum", **PUBLIC) - _value(
        before, "minigpt5_time_per_output_token_seconds_sum", **PUBLIC
    )
    e2e = _value(after, "minigpt5_e2e_request_latency_seconds_sum", **PUBLIC) - _value(
        before, "minigpt5_e2e_request_latency_seconds_sum", **PUBLIC
    )
    assert 0 < per_token < e2e
