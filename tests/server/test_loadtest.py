"""The Locust load test (loadtest/, docs/LOADTEST.md): cost arithmetic against hand-computed figures,
the SLO gate's verdicts, and bounded runs of the real locustfile against the tiny server."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.cost import CostAssumptions, compute_cost, rates
from loadtest.slo import SloTargets, evaluate, parse_mix

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = "loadtest/locustfile.py"
GATE_FAILED = 3


# --- cost arithmetic -----------------------------------------------------------------------------------


def test_cost_matches_the_hand_computation():
    # T = 50 tokens/s, R = 0.5 requests/s, C = $2.00/hour, u = 0.5, K = 7,000 tokens/user/month, H = 730 h
    #   tokens per hour delivered      = 50 * 3600 * 0.5                 = 90,000
    #   USD per 1,000 tokens           = 2.00 / 90,000 * 1000            = 0.0222222...
    #   requests per hour delivered    = 0.5 * 3600 * 0.5                = 900
    #   USD per 1,000 requests         = 2.00 / 900 * 1000               = 2.222222...
    #   tokens per server-month        = 90,000 * 730                    = 65,700,000
    #   monthly users per server       = floor(65,700,000 / 7,000)       = floor(9,385.71) = 9,385
    #   servers for 100,000 users      = ceil(100,000 * 7,000 / 65,700,000) = ceil(10.654) = 11
    #   USD per server-month           = 2.00 * 730                      = 1,460
    #   USD per month for 100,000      = 11 * 1,460                      = 16,060
    #   break-even tokens/s at $0.15   = 2.00 * 1000 / (0.15 * 3600 * 0.5) = 2000 / 270 = 7.4074...
    report = compute_cost(50.0, 0.5, CostAssumptions(gpu_hourly_usd=2.0, target_utilization=0.5))
    assert report.usd_per_1k_tokens == pytest.approx(0.0222222222)
    assert report.usd_per_1k_requests == pytest.approx(2.2222222222)
    assert report.tokens_per_server_month == pytest.approx(65_700_000)
    assert report.users_per_server == 9_385
    assert report.servers_for_monthly_users == 11
    assert report.usd_per_server_month == pytest.approx(1_460)
    assert report.usd_per_month_for_monthly_users == pytest.approx(16_060)
    assert report.break_even_tokens_per_s == pytest.approx(7.4074074)
    assert report.meets_target_usd_per_1k_tokens  # 0.0222 <= 0.15


def test_cost_with_the_seed_figures_at_full_utilisation():
    # T = 5 tokens/s, C = $3.00/hour, u = 1.0 (the server is busy all month):
    #   tokens per hour = 5 * 3600 = 18,000 -> USD per 1,000 tokens = 3.00 / 18 = 0.1666... > 0.15: missed
    #   tokens per server-month = 18,000 * 730 = 13,140,000 -> users = floor(13,140,000 / 7,000) = 1,877
    #   servers for 100,000 users = ceil(700,000,000 / 13,140,000) = ceil(53.27) = 54
    #   break-even = 3.00 * 1000 / (0.15 * 3600 * 1.0) = 3000 / 540 = 5.5555... tokens/s
    report = compute_cost(5.0, 0.1, CostAssumptions(gpu_hourly_usd=3.0, target_utilization=1.0))
    assert report.usd_per_1k_tokens == pytest.approx(0.1666666667)
    assert not report.meets_target_usd_per_1k_tokens
    assert report.users_per_server == 1_877
    assert report.servers_for_monthly_users == 54
    assert report.break_even_tokens_per_s == pytest.approx(5.5555556)
    # R = 0.1 requests/s -> 360 requests/hour -> 3.00 / 360 * 1000 = 8.333... USD per 1,000 requests
    assert report.usd_per_1k_requests == pytest.approx(8.3333333)


def test_cost_of_a_run_without_tokens_has_nothing_to_divide():
    report = compute_cost(0.0, 0.0, CostAssumptions())
    assert report.usd_per_1k_tokens is None and report.usd_per_1k_requests is None
    assert report.users_per_server == 0 and report.servers_for_monthly_users is None
    assert not report.meets_target_usd_per_1k_tokens
    assert any("nothing to price" in line for line in report.lines())
    json.dumps(report.to_dict())  # JSON-able as it is


def test_rates_divide_the_totals_by_the_wall_time():
    # 3,000 tokens and 90 requests in 60 s -> 50 tokens/s, 1.5 requests/s
    assert rates(3_000, 90, 60.0) == (50.0, 1.5)
    assert rates(3_000, 90, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_utilization": 0},
        {"target_utilization": 1.5},
        {"gpu_hourly_usd": -1},
        {"tokens_per_user_month": 0},
        {"target_usd_per_1k_tokens": 0},
    ],
)
def test_cost_assumptions_refuse_nonsense(kwargs):
    with pytest.raises(ValueError):
        CostAssumptions(**kwargs)


# --- mix and gate ----------------------------------------------------------------------------------------


def test_parse_mix():
    assert parse_mix("text=2,image_in=1,image_out=1") == {"text": 2.0, "image_in": 1.0, "image_out": 1.0}
    assert parse_mix("image_out") == {"text": 0.0, "image_in": 0.0, "image_out": 1.0}
    for bad in ("text=x", "video=1", "text=-1", "text=0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_gate_passes_and_fails_on_each_target():
    targets = SloTargets(p95_ms=2000, ttft_p95_ms=500, max_fail_ratio=0.01)
    ok = evaluate(targets, requests=200, failures=2, e2e_p95_ms=1900, ttft_p95_ms=450)
    assert all(c.passed for c in ok) and len(ok) == 4
    slow = evaluate(targets, requests=200, failures=0, e2e_p95_ms=2100, ttft_p95_ms=450)
    assert [c.name for c in slow if not c.passed] == ["p95 end-to-end ms"]
    late = evaluate(targets, requests=200, failures=0, e2e_p95_ms=1000, ttft_p95_ms=600)
    assert [c.name for c in late if not c.passed] == ["p95 time to first token ms"]
    failing = evaluate(targets, requests=200, failures=3, e2e_p95_ms=1000, ttft_p95_ms=100)  # 1.5% > 1%
    assert [c.name for c in failing if not c.passed] == ["failure ratio"]
    nothing = evaluate(targets, requests=0, failures=0, e2e_p95_ms=None, ttft_p95_ms=None)
    assert not any(c.passed for c in nothing)
    off = evaluate(
        SloTargets(p95_ms=0, ttft_p95_ms=0, max_fail_ratio=1), requests=5, failures=5, e2e_p95_ms=9e9, ttft_p95_ms=None
    )
    assert [c.name for c in off] == ["completed requests", "failure ratio"]  # latency checks off
    assert not off[0].passed  # ... but a run without one completed answer never passes


# --- the locustfile, no server ------------------------------------------------------------------------------


def locust(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m locust -f loadtest/locustfile.py ARGS` from the repository root."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "locust", "-f", LOCUSTFILE, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(
            f"locust did not finish within {timeout} s:\n{(error.stdout or b'')[-3000:]!r}\n"
            f"{(error.stderr or b'')[-3000:]!r}"
        )


def test_a_bad_option_stops_locust_before_the_run(tmp_path):
    result = locust(
        "--headless",
        "-u",
        "1",
        "-t",
        "5s",
        "--host",
        "http://127.0.0.1:9",
        "--mix",
        "video=1",
        "--cost-json",
        str(tmp_path / "cost.json"),
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown request kind 'video'" in result.stderr
    assert not (tmp_path / "cost.json").exists()


def test_a_run_without_a_server_fails_the_gate_and_still_reports(tmp_path):
    # Port 9 (discard) refuses connections; HTTP users only, so nothing is sent to HOST:8001.
    result = locust(
        "--headless",
        "-u",
        "1",
        "-r",
        "1",
        "-t",
        "3s",
        "--host",
        "127.0.0.1:9",
        "--cost-json",
        str(tmp_path / "cost.json"),
        "HttpStreamUser",
        timeout=60,
    )
    assert result.returncode == GATE_FAILED, result.stderr[-3000:]
    assert "FAIL  completed requests: 0" in result.stdout
    summary = json.loads((tmp_path / "cost.json").read_text())
    assert summary["run"]["grpc_url"] == "127.0.0.1:8001"  # --host's host, gRPC's port
    assert summary["run"]["failures"] == summary["run"]["requests"] <= 4  # --failure-pause: about 1 per second
    assert summary["cost"]["usd_per_1k_tokens"] is None and summary["slo"]["passed"] is False


# --- bounded runs against the tiny server -------------------------------------------------------------------

# Light load for 2 CPU cores that also run the server: 16 tokens, 4 diffusion steps, 4 users.
CI_LOAD = ["--max-tokens", "16", "--steps", "4", "--mix", "text=2,image_in=1,image_out=1"]


@pytest.fixture(scope="module")
def passing_run(triton_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest")
    result = locust(
        "--headless",
        "-u",
        "4",
        "-r",
        "4",
        "-t",
        "20s",
        "--stop-timeout",
        "20",
        "--host",
        f"http://{triton_server.http_url}",
        "--grpc-url",
        triton_server.grpc_url,
        "--csv",
        str(out / "run"),
        "--html",
        str(out / "run.html"),
        *CI_LOAD,
        "--slo-p95-ms",
        "600000",
        "--slo-ttft-p95-ms",
        "600000",
        "--max-fail-ratio",
        "0",
        timeout=120,
    )
    return result, out


@pytest.mark.server
def test_bounded_run_passes_the_gate_and_writes_the_reports(passing_run, triton_server):
    result, out = passing_run
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{triton_server.log_tail()}"
    assert "SLO gate: PASSED" in result.stdout
    assert (out / "run.html").stat().st_size > 0
    assert (out / "run_stats_history.csv").exists() and (out / "run_failures.csv").exists()
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader((out / "run_stats.csv").open())}
    aggregated = rows[("", "Aggregated")]
    assert int(aggregated["Request Count"]) > 0 and int(aggregated["Failure Count"]) == 0
    for protocol in ("gRPC", "HTTP"):
        for kind in ("text", "image_in", "image_out"):
            assert (protocol, kind) in rows, f"no {protocol} {kind} request in {sorted(rows)}"
        for extra in ("TTFT", "TTFI", "E2E", "TOK/S"):
            assert int(rows[(extra, protocol)]["Request Count"]) > 0, (extra, protocol)
            assert int(rows[(extra, protocol)]["Failure Count"]) == 0
    # The extra rows stay out of "Aggregated": it counts the requests themselves.
    requests = sum(int(r["Request Count"]) for (kind, _), r in rows.items() if kind in ("gRPC", "HTTP"))
    assert int(aggregated["Request Count"]) == requests
    # The CSV holds the final numbers (Locust alone refreshes it once a second, not at the end).
    assert requests == json.loads((out / "run_cost.json").read_text())["run"]["requests"]


@pytest.mark.server
def test_bounded_run_writes_a_sane_cost_report(passing_run):
    result, out = passing_run
    summary = json.loads((out / "run_cost.json").read_text())  # next to the CSV files by default
    run, cost = summary["run"], summary["cost"]
    assert run["failures"] == 0 and run["completed_requests"] == run["requests"] > 0
    assert run["completion_tokens"] == run["text_tokens"] + run["vokens"] > 0
    assert run["vokens"] == 8 * run["images"] and run["images"] > 0  # image_out answers hold an image
    assert 15 <= run["wall_s"] < 60  # -t 20s, plus the answers in flight at the end
    assert run["tokens_per_s"] == pytest.approx(run["completion_tokens"] / run["wall_s"], rel=1e-3)
    assert run["requests_per_s"] == pytest.approx(run["completed_requests"] / run["wall_s"], rel=1e-3)
    # The report is the arithmetic of loadtest/cost.py on the measured rates.
    expected = compute_cost(run["tokens_per_s"], run["requests_per_s"], CostAssumptions())
    assert cost["usd_per_1k_tokens"] == pytest.approx(expected.usd_per_1k_tokens, rel=1e-3)
    assert cost["users_per_server"] == pytest.approx(expected.users_per_server, rel=1e-3)
    assert cost["assumptions"] == {
        "gpu_hourly_usd": 2.5,
        "target_utilization": 0.5,
        "tokens_per_user_month": 7000.0,
        "monthly_users": 100000,
        "target_usd_per_1k_tokens": 0.15,
        "hours_per_month": 730.0,
    }
    assert math.isfinite(cost["usd_per_1k_requests"]) and cost["servers_for_monthly_users"] >= 1
    latency = summary["latency_ms"]
    assert 0 < latency["ttft"]["p50"] <= latency["ttft"]["p95"] and latency["ttfi"]["count"] > 0
    assert summary["slo"]["passed"] is True
    assert "per 1,000 tokens" in result.stdout and "monthly users" in result.stdout  # printed too


@pytest.mark.server
def test_an_impossible_target_fails_the_gate(triton_server, tmp_path):
    result = locust(
        "--headless",
        "-u",
        "2",
        "-r",
        "2",
        "-t",
        "6s",
        "--stop-timeout",
        "20",
        "--host",
        f"http://{triton_server.http_url}",
        "--grpc-url",
        triton_server.grpc_url,
        "--csv",
        str(tmp_path / "run"),
        *CI_LOAD,
        "--slo-p95-ms",
        "1",
        "--slo-ttft-p95-ms",
        "1",
        timeout=90,
    )
    assert result.returncode == GATE_FAILED, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "SLO gate: FAILED" in result.stdout
    assert "FAIL  p95 end-to-end ms" in result.stdout and "FAIL  p95 time to first token ms" in result.stdout
    summary = json.loads((tmp_path / "run_cost.json").read_text())
    assert summary["slo"]["passed"] is False and summary["run"]["completed_requests"] > 0
