"""The naive upstream-style path, as the baseline of `bench e2e` (same modules, same run).

As upstream MiniGPT-5 serves it: the vision tower on the GPU, the image embeddings spliced into the
prompt embeddings, Hugging Face `generate(inputs_embeds=..., output_hidden_states=True,
return_dict_in_generate=True)` with upstream's sampling (top-p 0.9, temperature 1, repetition
penalty 2.0), the voken states taken from the returned hidden states, the mapper (conditional and
zero-voken unconditional branch, both per call), then a diffusers `StableDiffusionPipeline` built from
the same UNet and VAE (no text encoder, no tokenizer, no safety checker) called with
`prompt_embeds`/`negative_prompt_embeds`, PNDM, 50 steps, guidance 7.5, PIL output.

Random weights never sample [IMG0], so `min_new_tokens = max_new_tokens` fixes the length and the
last 8 generated positions' final-layer states stand in for the voken states: the same tensors and
cost as upstream's selection. Upstream's [IMG1..7] forcing is not reproduced (7 tokens of 512).
"""

from __future__ import annotations

import numpy as np
import torch

from minigpt5.config import NUM_VOKENS, SCHEDULER
from minigpt5.image_decoder import make_scheduler

from .timing import Stopwatch


def make_sd_pipeline(modules: dict, scheduler_config: dict = SCHEDULER):
    from diffusers import StableDiffusionPipeline

    scheduler = make_scheduler("pndm", scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=modules["vae"],
        text_encoder=None,
        tokenizer=None,
        unet=modules["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # DiffusionPipeline's, untyped
    return pipe


@torch.inference_mode()
def naive_once(
    modules: dict,
    pipe,
    tokens: dict,
    prompt: list[int],
    image: np.ndarray,
    device,
    *,
    max_tokens: int,
    steps: int,
    seed: int = 0,
    guidance_scale: float = 7.5,
) -> dict:
    tower, llm, mapper = modules["vision"], modules["llm"], modules["mapper"]
    clock = Stopwatch(device)
    image_embeds = tower(torch.from_numpy(image).to(device))  # [1, 32, H], stays on the GPU
    vision_ms = clock.ms()

    ids = torch.tensor(prompt, device=device)
    slot = int((ids == tokens["image_placeholder"]).nonzero()[0])
    text = llm.get_input_embeddings()(ids)
    embeds = torch.cat([text[:slot], image_embeds[0].to(text.dtype), text[slot + 1 :]])[None]
    torch.manual_seed(seed)
    out = llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=device),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=True,
        top_p=0.9,
        top_k=0,
        temperature=1.0,
        repetition_penalty=2.0,
        output_hidden_states=True,
        return_dict_in_generate=True,
        pad_token_id=tokens["eos_id"],
        eos_token_id=tokens["eos_id"],
        bos_token_id=tokens["bos_id"],
    )
    generated = out.sequences.shape[1]
    # hidden_states: one tuple per generation step, each (embeddings, layer 1 … layer N after the norm).
    voken_states = torch.cat([step[-1][:, -1] for step in out.hidden_states[-NUM_VOKENS:]])[None]
    generate_ms = clock.ms() - vision_ms

    cond = mapper(voken_states)
    uncond = mapper(torch.zeros_like(voken_states))
    started = clock.ms()
    result = pipe(
        prompt_embeds=cond.to(pipe.unet.dtype),
        negative_prompt_embeds=uncond.to(pipe.unet.dtype),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator(device).manual_seed(seed),
        output_type="pil",
    )
    total_ms = clock.ms()
    picture = result.images[0]
    return {
        "ms": round(total_ms, 1),
        "vision_ms": round(vision_ms, 1),
        "generate_ms": round(generate_ms, 1),
        "mapper_ms": round(started - vision_ms - generate_ms, 1),
        "sd_pipeline_ms": round(total_ms - started, 1),
        "completion_tokens": generated,
        "image_size": list(picture.size),
        "steps": steps,
        "scheduler": "pndm",
    }
