"""End to end through the repository's own stages: 'one image + prompt in, N tokens + one image out'.

The loop is MiniGPT5Pipeline.stream's (pipeline.py), with split times: VisionStage.encode →
DecoderStage.make_request → DecodeEngine.submit/step → on the voken block ImageStage.decode (mapper,
UNet with CFG, scheduler, VAE, uint8 to host). force_image (mode end) makes the turn contain exactly one
image; with random weights [IMG0] is then forced at the last chance, so the image is decoded after the text
(the latest it can come; a real model draws it earlier, which overlaps nothing in this serial loop).
"""

from __future__ import annotations

import numpy as np
import torch

from minigpt5.config import NUM_VOKENS, VISION_IMAGE_SIZE
from minigpt5.engine import Finished, VokenStates
from minigpt5.image_decoder import ImageJob, image_seed
from minigpt5.sampling import SamplingParams

from .timing import Stopwatch


def input_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, VISION_IMAGE_SIZE, VISION_IMAGE_SIZE, 3), dtype=np.uint8)


def run_once(
    stages: dict,
    prompt: list[int],
    image: np.ndarray,
    device,
    *,
    max_tokens: int,
    steps: int,
    scheduler: str,
    seed: int = 0,
    guidance_scale: float = 7.5,
) -> dict:
    vision, decoder, images_stage = stages["vision"], stages["decoder"], stages["images"]
    engine = decoder.engine
    if engine.has_work:
        raise RuntimeError("the engine still holds requests from an earlier section")
    clock = Stopwatch(device)
    image_embeds = vision.encode(image)
    vision_ms = clock.ms()
    # max_tokens here counts generated positions (the benchmark's "N tokens"); the engine counts sampled
    # ids, and the one image's 7 forced vokens come on top of them.
    sampling = SamplingParams(
        max_tokens=max_tokens - (NUM_VOKENS - 1), seed=seed, force_image=True, force_image_mode="end", max_images=1
    )
    engine.submit(decoder.make_request(f"bench-e2e-{scheduler}-{seed}", prompt, image_embeds, sampling))
    first_token_ms: float | None = None
    image_ms, finished = 0.0, None
    outputs: list[np.ndarray] = []
    while engine.has_work:
        events = engine.step()
        if first_token_ms is None:
            first_token_ms = clock.ms()
        for event in events:
            if isinstance(event, VokenStates):
                started = clock.ms()
                job = ImageJob(event.states, image_seed(seed, len(outputs)), guidance_scale, steps, scheduler)
                outputs.append(images_stage.decode([job])[0])
                image_ms += clock.ms() - started
            elif isinstance(event, Finished):
                finished = event
    total_ms = clock.ms()
    first_token_ms = total_ms if first_token_ms is None else first_token_ms
    return {
        "ms": round(total_ms, 1),
        "vision_ms": round(vision_ms, 1),
        "first_token_ms": round(first_token_ms, 1),  # vision + embedding splice + prefill + first sample
        "decode_ms": round(total_ms - first_token_ms - image_ms, 1),
        "image_ms": round(image_ms, 1),
        "prompt_positions": len(prompt) + 31 * len(image),
        "completion_tokens": finished.completion_tokens if finished else None,
        "finish_reason": finished.reason if finished else None,
        "images": len(outputs),
        "image_shape": list(outputs[0].shape) if outputs else None,
        "scheduler": scheduler,
        "steps": steps,
    }


def ready(stages: dict, prompt: list[int], image: np.ndarray, device) -> None:
    """Untimed short run through every piece (CUDA context, cuBLAS/cuDNN handles, schedulers)."""
    for scheduler in ("pndm", "dpm"):
        run_once(stages, prompt, image, device, max_tokens=10, steps=2, scheduler=scheduler, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
