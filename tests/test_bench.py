"""`minigpt5 bench stages|e2e` on the tiny preset on CPU (seconds), and full-preset parameter counts
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
    """Run `minigpt5 bench <argv>` through the real entry point; return the exit code and the one
    JSON object printed on stdout."""
    from minigpt5.cli import main

    capsys.readouterr()
    code = main(["bench", *argv])
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
    code, data = bench(["e2e", *TINY, "--max-tokens", "16", "--steps", "2", "--dpm-steps", "2",
                        "--vision-batches", "1,2", "--unet-batches", "1,2", "--decode-batches", "1,3",
                        "--decode-steps", "3", "--hbm-gbps", "100", "--out", str(out), "--json"], capsys)
    assert code == 0 and data["errors"] == 0
    assert json.loads(out.read_text()) == data  # --out holds the same object
    assert set(data["stages"]) == {"vision_b1", "vision_b2", "prefill", "decode_token", "mapper",
                                   "unet_step_cfg_b1", "unet_step_cfg_b2", "vae_decode"}
    for result in data["stages"].values():
        _positive_timing(result)
    assert data["stages"]["unet_step_cfg_b2"]["unet_batch"] == 4

    for batch in (1, 3):
        decode = data["decode"][f"b{batch}"]
        assert decode["batch"] == batch and decode["method"] == "DecodeEngine.step"
        assert decode["ms_per_token"] > 0 and decode["step"]["n"] == 3
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


def test_e2e_budget_and_skip(capsys):
    """A spent budget skips every optional section (the build always runs); --skip names sections."""
    code, data = bench(["e2e", *TINY, "--budget-s", "0.001", "--skip", "naive"], capsys)
    assert code == 0 and data["errors"] == 0 and data["build"]["seconds"] >= 0
    assert data["stages"]["vision_b1"]["skipped"] == "budget"
    assert data["decode"]["b32"]["skipped"] == "budget"
    assert data["e2e"]["pndm"]["skipped"] == "budget" and data["e2e"]["dpm"]["skipped"] == "budget"
    assert data["naive"]["warmup"] == {"skipped": "flag"} and data["naive"]["pndm"] == {"skipped": "flag"}
    assert data["summary"]["e2e_ms"] is None and data["summary"]["speedup_vs_naive"] is None


def test_failing_section_is_recorded_and_the_run_goes_on(capsys):
    """40 rows exceed the engine's 32: that section fails, the next sections still run."""
    code, data = bench(["e2e", *TINY, "--decode-batches", "40", "--decode-steps", "2", "--max-tokens", "16",
                        "--steps", "2", "--skip", "stages,naive,e2e_dpm"], capsys)
    assert code == 1 and data["errors"] == 1
    assert "max_rows" in data["decode"]["b40"]["error"]
    assert data["e2e"]["pndm"]["completion_tokens"] == 16 and data["e2e"]["pndm"]["images"] == 1


def test_cpu_has_no_hbm_floor(capsys):
    code, data = bench(["e2e", *TINY, "--decode-batches", "1", "--decode-steps", "2",
                        "--skip", "stages,e2e,naive,e2e_dpm"], capsys)
    assert code == 0
    assert data["hbm"]["gbps"] is None
    assert data["decode"]["b1"]["hbm"]["ratio_to_floor"] is None and data["decode"]["b1"]["ms_per_token"] > 0


@pytest.mark.parametrize("component, expected", [
    ("vision_vit", 0.99e9), ("qformer", 0.105e9), ("llm", 6.74e9), ("mapper", 0.123e9), ("unet", 0.87e9)])
def test_full_preset_parameter_counts_on_meta(component, expected):
    from minigpt5.bench.models import meta_parameter_counts

    counts = _full_counts(meta_parameter_counts)
    assert counts[component] == pytest.approx(expected, rel=0.03)


_FULL_COUNTS: dict = {}


def _full_counts(counter) -> dict:
    if not _FULL_COUNTS:
        _FULL_COUNTS.update(counter("full"))
    return _FULL_COUNTS


def test_args_import_without_torch():
    code = ("import sys, argparse; import minigpt5.bench.args as a; "
            "p = argparse.ArgumentParser(); a.add_bench_commands(p.add_subparsers()); "
            "assert 'torch' not in sys.modules, 'bench.args imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benches_register_on_any_subparsers():
    """The extension contract: add_bench_commands fills a bare `bench` parser; each handler is set."""
    from minigpt5.bench.args import BENCHES, add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="which", required=True))
    assert len(BENCHES) >= 2
    for name in ("stages", "e2e"):
        args = parser.parse_args([name])
        assert callable(args.handler) and args.preset in ("tiny", "full")
