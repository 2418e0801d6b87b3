"""`minigpt5-bench stages|e2e` on the tiny preset on CPU (seconds), and full-preset parameter counts
on the meta device (no memory). Benchmarks are commands that print JSON, not timed tests: these
tests check the harness and its JSON, never the numbers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

TINY = ["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "1", "--prefill-tokens", "64"]
TIMING_KEYS = {"ms", "min_ms", "max_ms", "n"}


def bench(argv: list[str], capsys) -> tuple[int, dict]:
    """Run `minigpt5-bench <argv>` through the real entry point; return the exit code and the one
    JSON object printed on stdout."""
    from minigpt5_bench.__main__ import main

    capsys.readouterr()
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)  # json.loads refuses anything after the object


def _positive_timing(result: dict) -> None:
    assert TIMING_KEYS <= result.keys(), result
    assert 0 < result["min_ms"] <= result["ms"] <= result["max_ms"], result


def test_stages_tiny_cpu(capsys):
    code, data = bench(["stages", *TINY, "--json"], capsys)
    assert code == 0 and data["errors"] == 0
    assert data["bench"] == "stages" and data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["env"]["torch"] and data["env"]["transformers"]
    assert set(data["stages"]) == {"vision", "prefill", "decode_token", "mapper", "unet_step_cfg", "vae_decode"}
    for result in data["stages"].values():
        _positive_timing(result)
    assert data["stages"]["decode_token"]["method"] == "direct_cached_forward"
    assert data["stages"]["prefill"]["tokens"] == 64
    assert data["stages"]["unet_step_cfg"]["unet_batch"] == 2
    params = data["params"]
    assert all(params[k] > 0 for k in ("vision_vit", "qformer", "llama_proj", "llm", "mapper", "unet", "vae"))
    assert params["total"] == sum(v for k, v in params.items() if k != "total")


def test_e2e_tiny_cpu(capsys, tmp_path):
    out = tmp_path / "e2e.json"
    code, data = bench(
        [
            "e2e",
            *TINY,
            "--max-tokens",
            "16",
            "--steps",
            "2",
            "--dpm-steps",
            "2",
            "--vision-batches",
            "1,2",
            "--unet-batches",
            "1,2",
            "--decode-batches",
            "1,3",
            "--decode-steps",
            "3",
            "--hbm-gbps",
            "100",
            "--decode-graphs",
            "on",
            "--out",
            str(out),
            "--json",
        ],
        capsys,
    )
    assert code == 0 and data["errors"] == 0
    assert json.loads(out.read_text()) == data  # --out holds the same object
    assert set(data["stages"]) == {
        "vision_b1",
        "vision_b2",
        "prefill",
        "decode_token",
        "mapper",
        "unet_step_cfg_b1",
        "unet_step_cfg_b2",
        "vae_decode",
    }
    for result in data["stages"].values():
        _positive_timing(result)
    assert data["stages"]["unet_step_cfg_b2"]["unet_batch"] == 4

    for batch in (1, 3):
        decode = data["decode"][f"b{batch}"]
        assert decode["batch"] == batch and decode["method"] == "DecodeEngine.step"
        assert decode["ms_per_token"] > 0 and decode["step"]["n"] == 3
        # static shapes on (eagerly: no CUDA here), then the same rows timed with them off
        assert decode["decode_mode"] == "static shapes, eager"
        assert decode["eager_step"]["n"] == 3 and decode["eager_ms_per_token"] > 0
        assert 0 <= decode["static_vs_eager_error"] < 1e-5
        assert decode["speedup_vs_eager"] == pytest.approx(
            decode["eager_ms_per_token"] / decode["ms_per_token"], abs=1e-3
        )
        floor = decode["hbm"]
        assert floor["gbps"] == 100 and floor["floor_weights_ms"] > 0 and floor["ratio_to_floor"] > 0
        assert floor["read_per_step_bytes"] < data["hbm"]["weight_bytes"]
        assert floor["floor_with_kv_ms"] > floor["floor_weights_ms"]

    for name, steps in (("pndm", 2), ("dpm", 2)):
        run = data["e2e"][name]
        assert run["completion_tokens"] == 16 and run["images"] == 1 and run["finish_reason"] == "length"
        assert run["image_shape"] == [32, 32, 3] and run["steps"] == steps and run["scheduler"] == name
        assert run["prompt_positions"] == 64
        assert 0 < run["vision_ms"] <= run["first_token_ms"] <= run["ms"] and run["image_ms"] > 0
    naive = data["naive"]["pndm"]
    assert naive["completion_tokens"] == 16 and naive["image_size"] == [32, 32] and naive["sd_pipeline_ms"] > 0

    summary = data["summary"]
    assert summary["e2e_ms"] == data["e2e"]["pndm"]["ms"] and summary["naive_ms"] == naive["ms"]
    assert summary["ratio_to_2s_target"] == pytest.approx(summary["e2e_ms"] / 2000, abs=1e-3)
    assert summary["speedup_vs_naive"] == pytest.approx(naive["ms"] / summary["e2e_ms"], abs=0.01)
    assert summary["e2e_dpm_ms"] > 0 and summary["dpm_speedup_vs_naive"] > 0
    assert set(summary["decode_ms_per_token"]) == {"b1", "b3"}
    assert all(v > 0 for v in summary["decode_ratio_to_hbm_floor"].values())

    fp8 = data["fp8"]  # last: the LLM's layers quantised in place, a fresh engine, decode and e2e again
    assert fp8["quantize"]["quantized_linears"] > 0 and fp8["quantize"]["skipped_linears"] == 0
    assert fp8["quantize"]["weight_bytes_after"] < fp8["quantize"]["weight_bytes_before"] / 3  # fp32 → fp8
    assert fp8["quantize"]["llm"]["read_per_step_bytes"] < data["hbm"]["read_per_step_bytes"]
    assert fp8["b1"]["ms_per_token"] > 0 and fp8["b3"]["decode_mode"] == "static shapes, eager"
    assert fp8["b1"]["hbm"]["floor_weights_ms"] < data["decode"]["b1"]["hbm"]["floor_weights_ms"]
    for name in ("e2e_pndm", "e2e_dpm"):
        assert fp8[name]["completion_tokens"] == 16 and fp8[name]["images"] == 1
    assert summary["fp8_e2e_ms"] == fp8["e2e_pndm"]["ms"] and summary["fp8_e2e_dpm_ms"] == fp8["e2e_dpm"]["ms"]
    assert set(summary["fp8_decode_ms_per_token"]) == {"b1", "b3"}


def test_e2e_budget_and_skip(capsys):
    """A spent budget skips every optional section (the build always runs); --skip names sections."""
    code, data = bench(["e2e", *TINY, "--budget-s", "0.001", "--skip", "naive"], capsys)
    assert code == 0 and data["errors"] == 0 and data["build"]["seconds"] >= 0
    assert data["stages"]["vision_b1"]["skipped"] == "budget"
    assert data["decode"]["b32"]["skipped"] == "budget"
    assert data["e2e"]["pndm"]["skipped"] == "budget" and data["e2e"]["dpm"]["skipped"] == "budget"
    assert data["naive"]["warmup"] == {"skipped": "flag"} and data["naive"]["pndm"] == {"skipped": "flag"}
    assert data["summary"]["e2e_ms"] is None and data["summary"]["speedup_vs_naive"] is None
    assert data["fp8"]["quantize"]["skipped"] == "budget" and data["summary"]["fp8_e2e_ms"] is None


def test_failing_section_is_recorded_and_the_run_goes_on(capsys):
    """40 rows exceed the engine's 32: that section fails, the next sections still run."""
    code, data = bench(
        [
            "e2e",
            *TINY,
            "--decode-batches",
            "40",
            "--decode-steps",
            "2",
            "--max-tokens",
            "16",
            "--steps",
            "2",
            "--skip",
            "stages,naive,e2e_dpm,fp8",
        ],
        capsys,
    )
    assert code == 1 and data["errors"] == 1
    assert "max_rows" in data["decode"]["b40"]["error"]
    assert data["e2e"]["pndm"]["completion_tokens"] == 16 and data["e2e"]["pndm"]["images"] == 1


def test_cpu_has_no_hbm_floor(capsys):
    code, data = bench(
        ["e2e", *TINY, "--decode-batches", "1", "--decode-steps", "2", "--skip", "stages,e2e,naive,e2e_dpm,fp8"], capsys
    )
    assert code == 0
    assert data["hbm"]["gbps"] is None
    assert data["decode"]["b1"]["hbm"]["ratio_to_floor"] is None and data["decode"]["b1"]["ms_per_token"] > 0


@pytest.mark.parametrize(
    "component, expected",
    [("vision_vit", 0.99e9), ("qformer", 0.105e9), ("llm", 6.74e9), ("mapper", 0.123e9), ("unet", 0.87e9)],
)
def test_full_preset_parameter_counts_on_meta(component, expected):
    from minigpt5_bench.models import meta_parameter_counts

    counts = _full_counts(meta_parameter_counts)
    assert counts[component] == pytest.approx(expected, rel=0.03)


_FULL_COUNTS: dict = {}


def _full_counts(counter) -> dict:
    if not _FULL_COUNTS:
        _FULL_COUNTS.update(counter("full"))
    return _FULL_COUNTS


def test_args_import_without_torch():
    code = (
        "import sys, argparse; import minigpt5_bench.args as a; "
        "p = argparse.ArgumentParser(); a.add_bench_commands(p.add_subparsers()); "
        "assert 'torch' not in sys.modules, 'bench.args imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benches_register_on_any_subparsers():
    """The extension contract: add_bench_commands fills a bare `bench` parser; each handler is set."""
    from minigpt5_bench.args import BENCHES, add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="which", required=True))
    assert len(BENCHES) >= 2
    for name in ("stages", "e2e"):
        args = parser.parse_args([name])
        assert callable(args.handler) and args.preset in ("tiny", "full")


# ---- bench batching and bench serving -----------------------------------------------------------
BATCHING_MODES = ("continuous", "run_to_completion")


def test_batching_small(capsys, tiny_weights):
    """Both engines, every workload, small settings: the JSON's shape, positive numbers, full-length
    requests. The targets are reported (targets_met), never asserted: timings are not tested."""
    import torch

    threads = torch.get_num_threads()
    code, data = bench(
        [
            "batching",
            "--weights",
            str(tiny_weights),
            "--concurrency",
            "1,4",
            "--max-tokens",
            "16",
            "--long-tokens",
            "32",
            "--short-tokens",
            "4",
            "--short-requests",
            "3",
            "--repeats",
            "1",
            "--json",
        ],
        capsys,
    )
    assert code == 0 and data["errors"] == 0, data
    assert torch.get_num_threads() == threads  # the bench's --threads 1 does not leak into the caller
    assert data["bench"] == "batching" and data["device"] == "cpu" and data["threads"] == 1
    assert data["settings"]["concurrency"] == [1, 4] and data["build"]["banned_ids"] >= 1
    assert data["tokens"]["all_full_length"] and data["tokens"]["counted"] == data["tokens"]["expected"] > 0
    for c in (1, 4):
        entry = data["throughput"][f"c{c}"]
        for mode in BATCHING_MODES:
            assert entry[mode]["tokens"] == 16 * c and entry[mode]["tokens_per_s"] > 0 and entry[mode]["wall_ms"] > 0
    ttft = data["ttft"]
    assert ttft["long_requests"] == 4 and len(ttft["short_arrivals_ms"]) == 3 and ttft["long_alone_ms"] > 0
    for mode in BATCHING_MODES:
        for phase in ("alone", "busy"):
            stats = ttft[mode][phase]
            assert stats["n"] == 3 and 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p95_ms"] <= stats["max_ms"]
        summary = data[mode]
        assert set(summary["throughput_tokens_per_s"]) == {"1", "4"}
        assert all(v > 0 for v in summary["throughput_tokens_per_s"].values())
        assert summary["throughput_gain"] > 0 and summary["short_ttft_p95_ratio"] > 0
        assert summary["short_ttft_p95_ratio"] == pytest.approx(
            summary["short_ttft_p95_ms"]["busy"] / summary["short_ttft_p95_ms"]["alone"], rel=1e-2
        )
        assert summary["busy_tokens_per_s"] > 0
    assert data["throughput_gain_at"] == 4  # 8 was not measured: the gain is 4 vs 1, not judged
    assert data["targets"] == {"throughput_gain_min": 4.0, "short_ttft_p95_ratio_max": 2.0}
    assert data["targets_met"]["throughput_gain"] is None
    assert isinstance(data["targets_met"]["short_ttft_p95_ratio"], bool)


def test_percentiles_are_nearest_rank():
    from minigpt5_bench.stats import p95, percentile

    assert p95([1.0]) == 1.0
    assert p95([float(v) for v in range(1, 21)]) == 19.0  # ceil(0.95 * 20) = 19th sample
    assert p95([float(v) for v in range(1, 25)]) == 23.0
    assert p95([float(v) for v in range(100, 0, -1)]) == 95.0  # sorted first; 0.95 * 100 exactly
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([], 95) is None


@pytest.mark.server
def test_serving_small(tiny_weights, tmp_path):
    """The real tritonserver, started and stopped by the bench: keys, positive finite ratios, and the
    served results equal to the in-process ones. A fresh process, so that the bench can set the
    in-process OpenMP wait policy before torch is imported (as the Triton stubs have it)."""
    import math

    out = tmp_path / "serving.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "minigpt5_bench",
            "serving",
            "--weights",
            str(tiny_weights),
            "--requests",
            "2",
            "--max-tokens",
            "16",
            "--steps",
            "4",
            "--streams",
            "1,3",
            "--stream-tokens",
            "12",
            "--stream-rounds",
            "2",
            "--stream-repeats",
            "2",
            "--short-requests",
            "2",
            "--long-tokens",
            "300",
            "--threads",
            "1",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads(run.stdout)
    assert json.loads(out.read_text()) == data and data["errors"] == 0
    assert data["bench"] == "serving" and data["in_process_openmp"]["applied"]
    assert data["server"]["ready"]["startup_s"] > 0 and data["server"]["exit_code"] is not None

    latency, overlap = data["latency"], data["overlap"]
    assert latency["image_token_index"] == 16 - 8  # forced at the last chance: the image comes last
    assert overlap["image_token_index"] <= 4 and overlap["tokens_after_image"] >= 1
    assert latency["same_text_as_in_process"] and latency["same_image_as_in_process"]
    assert overlap["same_text_as_in_process"] and overlap["same_image"]
    for key in ("served_ms", "in_process_ms"):
        assert latency[key]["n"] == 2 and latency[key]["ms"] > 0
    for key in ("served_ms", "decoder_only_ms", "image_only_ms", "sequential_ms", "in_process_serial_ms"):
        assert overlap[key]["n"] == 2 and overlap[key]["ms"] > 0
    assert 0 < overlap["decoder_only_vokens_ms"] <= overlap["decoder_only_ms"]["max_ms"]

    summary = data["summary"]
    for key in (
        "served_over_in_process_latency_ratio",
        "image_overlap_gain",
        "ideal_overlap_gain",
        "served_latency_ms",
        "in_process_latency_ms",
        "overlapped_ms",
        "sequential_ms",
        "time_to_first_token_ms",
        "time_to_first_image_ms",
    ):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["time_to_first_token_ms"] <= summary["time_to_first_image_ms"] <= summary["overlapped_ms"] + 1
    assert data["served_over_in_process_latency_ratio"] == summary["served_over_in_process_latency_ratio"]
    assert data["image_overlap_gain"] == summary["image_overlap_gain"]

    streaming = data["streaming"]
    assert sorted(streaming["levels"]) == ["1", "3"] and streaming["threads"] == 1
    for n, level in streaming["levels"].items():
        served, alone = level["served"], level["engine_alone"]
        assert served["requests"] == alone["requests"] == 2 * int(n)
        assert level["same_tokens"] and served["tokens"] == alone["tokens"] > 0  # same seeds, same tokens
        assert served["tokens_per_s"] > 0 and level["served_over_engine"] > 0
        # CPU seconds per 1,000 tokens of every process: tritonserver, the four stubs and the client
        processes = set(served["cpu_s_per_1k_tokens"])
        assert {"tritonserver", "stub minigpt5", "stub vicuna_decoder", "bench (client)"} <= processes
        assert served["cpu_s_per_1k_tokens"]["stub vicuna_decoder"] > 0
    assert summary["served_over_engine_tokens_per_s"] == {
        n: v["served_over_engine"] for n, v in streaming["levels"].items()
    }
    short = data["short_ttft"]
    assert len(short["alone_ms"]) == 2 * data["streaming"]["repeats"] and all(ms > 0 for ms in short["alone_ms"])
    assert short["busy_samples"] == len(short["busy_ms"]) <= 2 * data["streaming"]["repeats"]


def test_new_benches_register():
    from minigpt5_bench.args import BENCHES, add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="which", required=True))
    assert len(BENCHES) >= 4
    batching = parser.parse_args(["batching"])
    assert batching.concurrency == [1, 4, 8, 16] and batching.preset == "tiny" and callable(batching.handler)
    serving = parser.parse_args(["serving", "--requests", "3"])
    assert serving.requests == 3 and serving.weights is None and callable(serving.handler)


# ---- bench cache ----------------------------------------------------------------------------------------
def test_cache_small(capsys, tiny_weights):
    """Both paths, both workloads, small settings: the JSON's shape and what the caches must do whatever
    the timings (vision images = distinct images, fewer prefill positions, the same tokens)."""
    code, data = bench(
        [
            "cache",
            "--weights",
            str(tiny_weights),
            "--turns",
            "3",
            "--concurrency",
            "4",
            "--max-tokens",
            "8",
            "--repeats",
            "1",
            "--skip",
            "served",
            "--json",
        ],
        capsys,
    )
    assert code == 0 and data["errors"] == 0, data
    assert data["bench"] == "cache" and data["config"]["threads"] == 1 and data["build"]["block_tokens"] == 16
    chat, shared = data["chat"], data["shared"]
    for mode in ("cache", "no_cache"):
        assert len(chat[mode]["ttft_ms"]) == 3 and min(chat[mode]["ttft_ms"]) > 0
        assert chat[mode]["prompt_positions"][0] < chat[mode]["prompt_positions"][1] < chat[mode]["prompt_positions"][2]
        assert shared[mode]["tokens_per_s"] > 0
    assert chat["no_cache"]["prefill_positions"] == chat["no_cache"]["prompt_positions"]
    assert chat["cache"]["prefill_positions"][0] == chat["cache"]["prompt_positions"][0]  # empty caches at the start
    assert all(c < n for c, n in zip(chat["cache"]["prefill_positions"][1:], chat["no_cache"]["prefill_positions"][1:]))
    assert chat["no_cache"]["vision_images"] == [1, 2, 3] and chat["cache"]["vision_images"] == [1, 1, 1]
    assert chat["cache"]["vision_images_total"] == chat["distinct_images"] == 3
    assert chat["same_tokens"] and shared["same_tokens"] and shared["requests"] == 4
    assert shared["cache"]["prefill_positions_per_request"] < shared["no_cache"]["prefill_positions_per_request"]
    assert chat["ttft_ratio"] == [
        pytest.approx(c / n, abs=1e-3) for c, n in zip(chat["cache"]["ttft_ms"], chat["no_cache"]["ttft_ms"])
    ]
    summary = data["summary"]
    assert summary["turn_last_ttft_ratio"] == chat["ttft_ratio"][-1] and summary["chat_vision_images"] == 3
    assert len(chat["ttft_ratio_best"]) == 3 and summary["turn_last_ttft_ratio_best"] == chat["ttft_ratio_best"][-1]
    assert summary["met"]["vision_images_equal_distinct"] and summary["met"]["same_tokens"]
    assert isinstance(summary["met"]["turn_last_ttft_ratio"], bool)  # reported, never asserted
