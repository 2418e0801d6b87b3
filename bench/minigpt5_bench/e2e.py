"""`minigpt5-bench e2e`: the whole performance picture in one command (docs/BENCHMARKS.md).

Sections, in priority order (a section the --budget-s cannot fit is skipped, not overrun):
  stages   vision at --vision-batches, prefill, direct decode, mapper, UNet+CFG at --unet-batches, VAE
  decode   DecodeEngine ms/token at --decode-batches, with the HBM floor of the LLM's dtype
  e2e      one image + prompt in, --max-tokens tokens + one image out, PNDM --steps (the repository path)
  naive    the same request through HF generate + diffusers StableDiffusionPipeline (upstream style)
  e2e_dpm  the repository path with DPM-Solver++ --dpm-steps
  fp8      the LLM's layer weights quantised to fp8 in place (fp8.py), then decode and both end-to-end
           runs again on a fresh engine (last: it changes the LLM for good)

Decode runs the server's default: 1-token steps at static shapes, captured as CUDA graphs on a GPU
(--decode-graphs); each decode batch is then also timed eagerly, so `speedup_vs_eager` is one run's ratio.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from minigpt5.config import SCHEDULER
from minigpt5.fp8 import fp8_available, quantize_llm_fp8

from .decode import decode_sweep_estimate_s, engine_decode, hbm_floor
from .models import BASE_VOCAB, bench_tokenizer, llm_bytes, make_decoder, make_stages, prompt_ids
from .naive import make_sd_pipeline, naive_once
from .one_answer import input_image, ready, run_once
from .report import Report
from .stage_latency import (
    build,
    time_decode_direct,
    time_mapper,
    time_prefill,
    time_unet_step,
    time_vae_decode,
    time_vision,
)
from .stats import ratio
from .timing import hbm_bandwidth, log, memory

TARGET_MS = 2000.0  # the product's end-to-end target
QUANTIZE_ESTIMATE_S = 20.0  # 7B: the fp8 conversion, a fresh KV pool and the graph captures
NOTES = {
    "weights": "random, built on the device: timings only, never quality",
    "stages": "module forward on device-resident inputs, median of --repeats after --warmup, synchronised",
    "decode": "DecodeEngine.step at B rows (forward + sampling + detokenising); ms_per_token = median "
    "step (CUDA graphs when cuda_graphs), eager_ms_per_token = the same rows right after with "
    "static decode off; floor = LLM bytes read per step (all but the input-embedding table) / "
    "bandwidth",
    "e2e": "one run each: VisionStage.encode -> DecoderStage engine (force_image, EOS banned) -> "
    "ImageStage.decode, host copies included",
    "naive": "HF generate(output_hidden_states) + diffusers StableDiffusionPipeline (PNDM), same modules",
    "fp8": "decoder-layer weights fp8 e4m3 with per-channel scales, activations per token (torch._scaled_mm); "
    "embeddings, norms, lm_head and the KV cache keep --dtype; floor counts 1 byte per fp8 weight",
}


def main(args) -> int:
    report = Report("e2e", budget_s=args.budget_s, skip=args.skip, out=args.out)
    ctx = build(report, args)
    if ctx is None:
        return report.finish()
    device, modules = ctx["device"], ctx["modules"]
    static_decode = _switch(args.decode_graphs, device.type == "cuda")
    report.data["settings"].update(
        {
            "decode_graphs": args.decode_graphs,
            "static_decode": static_decode,
            "fp8": args.fp8,
            "max_tokens": args.max_tokens,
            "steps": args.steps,
            "dpm_steps": args.dpm_steps,
            "vision_batches": args.vision_batches,
            "unet_batches": args.unet_batches,
            "decode_batches": args.decode_batches,
            "decode_steps": args.decode_steps,
            "budget_s": args.budget_s,
            "skip": args.skip,
        }
    )
    stages: dict[str, Any] = {}
    report.section(
        ("build", "stages"), lambda: _make_stages(stages, modules, args.preset, static_decode), required=True
    )
    if not stages:
        return report.finish()
    tokens, image_decoder, llm = stages["tokens"], stages["images"].decoder, modules["llm"]
    bandwidth = hbm_bandwidth(device, args.hbm_gbps)
    report.data["hbm"] = {**bandwidth, **llm_bytes(llm)}
    report.data["notes"] = NOTES
    timing = {"repeats": args.repeats, "warmup": args.warmup}
    section = report.section

    # ---- per-stage latencies ------------------------------------------------------------------------
    for batch in args.vision_batches:
        section(
            ("stages", f"vision_b{batch}"),
            lambda b=batch: time_vision(modules["vision"], device, b, **timing),
            group="stages",
        )
    prefill = section(
        ("stages", "prefill"), lambda: time_prefill(llm, device, args.prefill_tokens, **timing), group="stages"
    )
    direct = section(
        ("stages", "decode_token"),
        lambda: time_decode_direct(llm, device, args.prefill_tokens, **timing),
        group="stages",
    )
    section(
        ("stages", "mapper"),
        lambda: time_mapper(modules["mapper"], device, llm.config.hidden_size, **timing),
        group="stages",
    )
    unet = {}
    for batch in args.unet_batches:
        unet[batch] = section(
            ("stages", f"unet_step_cfg_b{batch}"),
            lambda b=batch: time_unet_step(image_decoder, device, b, **timing),
            group="stages",
        )
    vae = section(("stages", "vae_decode"), lambda: time_vae_decode(image_decoder, device, 1, **timing), group="stages")

    # ---- engine decode at several batch sizes -------------------------------------------------------
    direct_ms = _ms(direct)
    decode = _decode_sweep(report, args, stages, device, bandwidth["gbps"], direct_ms, _ms(prefill), "decode")
    # ---- end to end: the repository's path, the naive path, the fast-scheduler option ---------------
    prompt = prompt_ids(tokens, args.prefill_tokens, BASE_VOCAB[args.preset], seed=args.seed)
    image = input_image(args.seed)
    token_ms = (decode.get(1) or {}).get("ms_per_token") or direct_ms
    step_ms = _ms(unet.get(1))

    def estimate(steps: int, factor: float = 1.0) -> float:
        if token_ms is None:
            return 0.0
        return factor * (args.max_tokens * token_ms + steps * (step_ms or 0.0) + (_ms(vae) or 0.0)) / 1e3 + 1.0

    section(
        ("e2e", "warmup"),
        lambda: _timed(lambda: ready(stages, prompt, image, device)),
        group="e2e",
        estimate_s=estimate(2) * 0.05,
    )

    def end_to_end(scheduler: str, steps: int):
        return lambda: run_once(
            stages, prompt, image, device, max_tokens=args.max_tokens, steps=steps, scheduler=scheduler, seed=args.seed
        )

    ours = section(("e2e", "pndm"), end_to_end("pndm", args.steps), group="e2e", estimate_s=estimate(args.steps, 1.2))
    holder = {}

    def naive_warmup():
        holder["pipe"] = make_sd_pipeline(modules, SCHEDULER)
        return _timed(
            lambda: naive_once(modules, holder["pipe"], tokens, prompt, image, device, max_tokens=10, steps=2, seed=1)
        )

    section(("naive", "warmup"), naive_warmup, group="naive", estimate_s=estimate(2) * 0.05)
    naive = None
    if "pipe" not in holder:
        warmup = report.data["naive"]["warmup"]
        report.set(("naive", "pndm"), dict(warmup) if "skipped" in warmup else {"skipped": "naive.warmup failed"})
    else:
        naive = section(
            ("naive", "pndm"),
            lambda: naive_once(
                modules,
                holder["pipe"],
                tokens,
                prompt,
                image,
                device,
                max_tokens=args.max_tokens,
                steps=args.steps,
                seed=args.seed,
            ),
            group="naive",
            estimate_s=estimate(args.steps, 1.5),
        )
    dpm = section(
        ("e2e", "dpm"), end_to_end("dpm", args.dpm_steps), group="e2e_dpm", estimate_s=estimate(args.dpm_steps, 1.2)
    )

    fp8 = {}
    fp8_runs, why_not = fp8_available(device)
    if _switch(args.fp8, fp8_runs):
        holder.clear()  # the naive pipeline holds the LLM's bf16 layers no more
        fp8 = _fp8_sections(
            report, args, stages, modules, device, bandwidth["gbps"], prompt, image, estimate, (direct_ms, _ms(prefill))
        )
    else:
        report.set(("fp8",), {"skipped": "flag" if args.fp8 == "off" else why_not})

    report.data["summary"] = summary(ours, dpm, naive, decode, fp8)
    report.data["memory"] = memory(device)
    log(_table(report.data["summary"]))
    return report.finish()


def _decode_sweep(report, args, stages: dict, device, gbps, direct_ms, prefill_ms, group: str) -> dict:
    """Engine decode ms/token at each --decode-batches, stored under `group`.b<N>."""
    llm, decode = stages["decoder"].llm, {}
    for batch in args.decode_batches:
        estimate = decode_sweep_estimate_s(direct_ms, batch, args.decode_steps, args.warmup, prefill_ms)
        if stages["decoder"].engine.static_decode:
            estimate *= 2  # the eager comparison

        def sweep(b=batch):
            result = engine_decode(
                stages["decoder"],
                stages["tokens"],
                device,
                batch=b,
                prompt_positions=args.prefill_tokens,
                steps=args.decode_steps,
                warmup=args.warmup,
                base_vocab=BASE_VOCAB[args.preset],
            )
            return {**result, "hbm": hbm_floor(llm, result, gbps)}

        decode[batch] = report.section((group, f"b{batch}"), sweep, group=group, estimate_s=estimate)
    return decode


def _fp8_sections(
    report,
    args,
    stages: dict,
    modules: dict,
    device,
    gbps,
    prompt,
    image,
    estimate,
    bf16_ms: tuple[float | None, float | None],
) -> dict:
    """Quantise the LLM in place, give it a fresh engine (graphs captured over the new weights; the
    old engine's KV pool is freed first), then decode and end to end again. The budget estimates use
    the --dtype timings `bf16_ms` (direct decode, prefill): fp8 should not be slower."""

    def quantize():
        stages["decoder"] = None  # its graphs point at the weights being replaced
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stats = quantize_llm_fp8(modules["llm"])
        stages["decoder"] = make_decoder(
            modules["llm"],
            stages["decoder_tokenizer"],
            stages["tokens"],
            static_decode=report.data["settings"]["static_decode"],
            capture_fallback=True,
        )
        return {**stats, "llm": llm_bytes(modules["llm"]), **_decode_mode(stages["decoder"].engine)}

    if report.section(("fp8", "quantize"), quantize, group="fp8", estimate_s=QUANTIZE_ESTIMATE_S) is None:
        return {}
    decode = _decode_sweep(report, args, stages, device, gbps, *bf16_ms, "fp8")
    results = {"decode": decode}
    for scheduler, steps in (("pndm", args.steps), ("dpm", args.dpm_steps)):
        results[scheduler] = report.section(
            ("fp8", f"e2e_{scheduler}"),
            lambda sc=scheduler, st=steps: run_once(
                stages, prompt, image, device, max_tokens=args.max_tokens, steps=st, scheduler=sc, seed=args.seed
            ),
            group="fp8",
            estimate_s=estimate(steps, 1.2),
        )
    return results


def summary(ours: dict | None, dpm: dict | None, naive: dict | None, decode: dict, fp8: dict) -> dict:
    ours_ms, dpm_ms, naive_ms = _ms(ours), _ms(dpm), _ms(naive)
    return {
        "target_ms": TARGET_MS,
        "e2e_ms": ours_ms,
        "ratio_to_2s_target": ratio(ours_ms, TARGET_MS),
        "naive_ms": naive_ms,
        "speedup_vs_naive": ratio(naive_ms, ours_ms, 2),
        "e2e_dpm_ms": dpm_ms,
        "dpm_ratio_to_2s_target": ratio(dpm_ms, TARGET_MS),
        "dpm_speedup_vs_naive": ratio(naive_ms, dpm_ms, 2),
        "decode_ms_per_token": {f"b{b}": r.get("ms_per_token") for b, r in decode.items() if r},
        "decode_ratio_to_hbm_floor": {f"b{b}": r["hbm"].get("ratio_to_floor") for b, r in decode.items() if r},
        "decode_speedup_vs_eager": {f"b{b}": r.get("speedup_vs_eager") for b, r in decode.items() if r},
        "fp8_e2e_ms": _ms(fp8.get("pndm")),
        "fp8_ratio_to_2s_target": ratio(_ms(fp8.get("pndm")), TARGET_MS),
        "fp8_e2e_dpm_ms": _ms(fp8.get("dpm")),
        "fp8_dpm_ratio_to_2s_target": ratio(_ms(fp8.get("dpm")), TARGET_MS),
        "fp8_decode_ms_per_token": {f"b{b}": r.get("ms_per_token") for b, r in fp8.get("decode", {}).items() if r},
        "fp8_decode_ratio_to_hbm_floor": {
            f"b{b}": r["hbm"].get("ratio_to_floor") for b, r in fp8.get("decode", {}).items() if r
        },
    }


def _ms(result: dict | None) -> float | None:
    if not result:
        return None
    return result.get("ms", result.get("ms_per_token"))


def _make_stages(into: dict, modules: dict, preset_name: str, static_decode: bool) -> dict:
    """VisionStage / DecoderStage / ImageStage over the built modules (bench/models.py)."""
    tokenizer = bench_tokenizer(preset_name)
    start = time.perf_counter()
    into.update(
        make_stages(modules, tokenizer, static_decode=static_decode, capture_fallback=True), decoder_tokenizer=tokenizer
    )
    return {
        "tokenizer": "word-level stand-in",
        "vocab_size": len(tokenizer),
        "engine": "DecodeEngine defaults, EOS banned",
        "seconds": round(time.perf_counter() - start, 2),
        **_decode_mode(into["decoder"].engine),
    }


def _decode_mode(engine) -> dict:
    """How the engine decodes; a failed graph capture is recorded here instead of ending the run."""
    return {"decode_mode": engine.decode_mode, "capture_error": engine.capture_error}


def _switch(setting: str, auto: bool) -> bool:
    return auto if setting == "auto" else setting == "on"


def _timed(fn) -> dict:
    start = time.perf_counter()
    fn()
    return {"seconds": round(time.perf_counter() - start, 2)}


def _table(s: dict) -> str:
    def fmt(value):
        return "-" if value is None else f"{value}"

    lines = [
        f"end to end (PNDM): {fmt(s['e2e_ms'])} ms  = {fmt(s['ratio_to_2s_target'])} × the 2 s target",
        f"end to end (DPM):  {fmt(s['e2e_dpm_ms'])} ms  = {fmt(s['dpm_ratio_to_2s_target'])} × the 2 s target",
        f"naive upstream:    {fmt(s['naive_ms'])} ms  → speedup {fmt(s['speedup_vs_naive'])}×",
        f"decode ms/token:   {s['decode_ms_per_token']}",
        f"  × HBM floor:     {s['decode_ratio_to_hbm_floor']}",
        f"  vs eager step:   {s['decode_speedup_vs_eager']}",
        f"fp8 end to end:    {fmt(s['fp8_e2e_ms'])} ms (PNDM), {fmt(s['fp8_e2e_dpm_ms'])} ms (DPM)",
        f"fp8 decode:        {s['fp8_decode_ms_per_token']} ms/token, × floor {s['fp8_decode_ratio_to_hbm_floor']}",
    ]
    return "summary\n" + "\n".join(lines)
