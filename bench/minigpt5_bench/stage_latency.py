"""`minigpt5-bench stages`: one latency per stage, real architecture, random weights on the device.

The measurement functions here are reused by `bench e2e` (batch sizes are arguments). Each returns
`{"ms": median, "min_ms", "max_ms", "n", ...}` from `timing.measure` plus what was measured.
"""

from __future__ import annotations

import inspect
import time

import torch
from transformers import DynamicCache

from minigpt5.config import NUM_VOKENS, VISION_IMAGE_SIZE

from .models import bench_arch, build_modules, parameter_counts, resolve
from .report import Report
from .timing import environment, log, measure, memory


@torch.inference_mode()
def time_vision(tower, device, batch: int, **timing) -> dict:
    """VisionTower forward on uint8 images already on the device (normalise → ViT → Q-Former → proj)."""
    images = torch.randint(0, 256, (batch, VISION_IMAGE_SIZE, VISION_IMAGE_SIZE, 3), dtype=torch.uint8, device=device)
    return {"batch": batch, **measure(lambda: tower(images), device, **timing)}


def _cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; accept both."""
    params = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prompt_embeds(llm, positions: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, llm.config.vocab_size - NUM_VOKENS - 1, (1, positions), generator=generator)
    return llm.get_input_embeddings()(ids.to(llm.device))


def _prefill(llm, embeds: torch.Tensor):
    cache = DynamicCache()
    out = llm.model(inputs_embeds=embeds, use_cache=True, **{_cache_keyword(llm): cache})
    return cache, llm.lm_head(out.last_hidden_state[:, -1])


@torch.inference_mode()
def time_prefill(llm, device, positions: int, **timing) -> dict:
    """Batch-1 prefill of `positions` embeddings into a fresh KV cache + the first token's logits
    (what DecodeEngine._prefill computes for a newcomer, there written into its KV slot)."""
    embeds = _prompt_embeds(llm, positions)
    return {"tokens": positions, **measure(lambda: _prefill(llm, embeds), device, **timing)}


@torch.inference_mode()
def time_decode_direct(llm, device, positions: int, **timing) -> dict:
    """Batch-1 decode: one cached forward of one token after a `positions` prefill, lm_head, argmax.
    The KV cache grows by one position per call. No engine: see `bench e2e` for the engine's cost."""
    cache, logits = _prefill(llm, _prompt_embeds(llm, positions))
    state = {"next": logits.argmax(-1, keepdim=True)}
    keyword = _cache_keyword(llm)

    def step():
        out = llm.model(input_ids=state["next"], use_cache=True, **{keyword: cache})
        state["next"] = llm.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)

    result = measure(step, device, **timing)
    return {"batch": 1, "kv_positions": positions, "method": "direct_cached_forward", **result}


@torch.inference_mode()
def time_mapper(mapper, device, llm_hidden: int, **timing) -> dict:
    """FeatureMapper on one image's 8 voken states → 77 × d conditioning."""
    states = torch.randn(1, NUM_VOKENS, llm_hidden, device=device)
    return {"batch": 1, **measure(lambda: mapper(states), device, **timing)}


@torch.inference_mode()
def time_unet_step(image_decoder, device, images: int, guidance_scale: float = 7.5, **timing) -> dict:
    """One denoising step with classifier-free guidance as ImageDecoder.decode runs it: the UNet on
    the batch [uncond, cond] (2 × images) + the guidance combine. The scheduler's elementwise update
    is not included."""
    unet = image_decoder.unet
    size, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(2 * images, channels, size, size, device=device, dtype=unet.dtype)
    cond = image_decoder.mapper(
        torch.randn(images, NUM_VOKENS, image_decoder.mapper.fc[0].in_features, device=device)
    ).to(unet.dtype)
    embeds = torch.cat([image_decoder.negative_embeds.to(unet.dtype).expand_as(cond), cond])
    timestep = torch.tensor(500, device=device)

    def step():
        noise = unet(latents, timestep, encoder_hidden_states=embeds).sample
        uncond, cond_noise = noise.float().chunk(2)
        return uncond + guidance_scale * (cond_noise - uncond)

    return {"images": images, "unet_batch": 2 * images, **measure(step, device, **timing)}


@torch.inference_mode()
def time_vae_decode(image_decoder, device, images: int = 1, **timing) -> dict:
    """ImageDecoder.latents_to_images: VAE decode of 64² latents to uint8 images on the host."""
    unet = image_decoder.unet
    size = unet.config.sample_size
    latents = torch.randn(images, unet.config.in_channels, size, size, device=device)
    result = measure(lambda: image_decoder.latents_to_images(latents), device, **timing)
    return {"images": images, "image_size": image_decoder.image_size, **result}


def build(report: Report, args) -> dict | None:
    """Resolve device/dtypes, build the five modules on the device, record env and parameters."""
    try:
        device, llm_dtype, image_dtype = resolve(args.device, args.dtype, args.image_dtype)
    except Exception as exc:  # noqa: BLE001 - e.g. --device cuda on a machine without one
        report.errors += 1
        report.set(("build",), {"error": f"{type(exc).__name__}: {exc}"})
        return None
    report.data.update(
        {
            "preset": args.preset,
            "device": str(device),
            "dtype": str(llm_dtype).split(".")[-1],
            "image_dtype": str(image_dtype).split(".")[-1],
            "env": environment(device),
        }
    )
    report.data["settings"] = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "prefill_tokens": args.prefill_tokens,
        "seed": args.seed,
    }
    arch = bench_arch(args.preset)

    holder = {}

    def construct():
        start = time.perf_counter()
        holder["modules"] = build_modules(arch, device, llm_dtype, image_dtype, seed=args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {
            "seconds": round(time.perf_counter() - start, 2),
            "on": "target device, random init (no CPU copy, no files, no hub)",
        }

    report.section(("build",), construct, required=True)
    modules = holder.get("modules")
    if modules is None:
        return None
    report.data["params"] = parameter_counts(modules)
    return {"device": device, "llm_dtype": llm_dtype, "image_dtype": image_dtype, "arch": arch, "modules": modules}


def main(args) -> int:
    report = Report("stages", out=args.out)
    ctx = build(report, args)
    if ctx is None:
        return report.finish()
    from minigpt5.image_decoder import ImageDecoder

    device, modules = ctx["device"], ctx["modules"]
    timing = {"repeats": args.repeats, "warmup": args.warmup}
    image_decoder = ImageDecoder(modules["mapper"], modules["unet"], modules["vae"])
    hidden = ctx["arch"]["llm"]["hidden_size"]
    report.section(("stages", "vision"), lambda: time_vision(modules["vision"], device, 1, **timing))
    report.section(("stages", "prefill"), lambda: time_prefill(modules["llm"], device, args.prefill_tokens, **timing))
    report.section(
        ("stages", "decode_token"), lambda: time_decode_direct(modules["llm"], device, args.prefill_tokens, **timing)
    )
    report.section(("stages", "mapper"), lambda: time_mapper(modules["mapper"], device, hidden, **timing))
    report.section(("stages", "unet_step_cfg"), lambda: time_unet_step(image_decoder, device, 1, **timing))
    report.section(("stages", "vae_decode"), lambda: time_vae_decode(image_decoder, device, 1, **timing))
    report.data["memory"] = memory(device)
    log(_table(report.data.get("stages", {})))
    return report.finish()


def _table(stages: dict) -> str:
    rows = [
        f"{name:>16}: {value['ms']:10.3f} ms" if "ms" in value else f"{name:>16}: {value}"
        for name, value in stages.items()
    ]
    return "stage latencies (median)\n" + "\n".join(rows)
