"""Custom metrics on the real server's /metrics after real requests, and the deployment files'
PromQL only naming metrics that really exist there (GPU-only `nv_*` families excepted on CPU)."""
from __future__ import annotations

import re
import urllib.request

import pytest

from deploy_metrics import TRITON_251_METRICS, documented_metrics, exposition_series_names, referenced_metric_names
from serving_helpers import assemble, grpc_stream

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
    result = assemble(grpc_stream(triton_server.grpc_url, {"text_input": "A picture, please.", "force_image": True,
                                                           "max_tokens": 20, "random_seed": 3}))
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
    missing = {name for name in referenced - exported
               if not (GPU_ONLY.match(name) and name in TRITON_251_METRICS)}
    assert not missing, f"dashboard/rules reference metrics the server does not export: {sorted(missing)}"
