"""The in-process reference pipeline: all stages in one process, no Triton.

`minigpt5 run` uses it, and the tests compare the served results against it: for a fixed seed a
lone served request must equal `MiniGPT5Pipeline.run` exactly (text and image pixels).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .engine import Finished, TextDelta, VokenStates
from .image_decoder import ImageJob, image_seed
from .placement import resolve_device, resolve_dtype
from .prompt import Turn
from .request import GenerationRequest, build_request
from .stages import DecoderStage, ImageStage, PromptBuilder, VisionStage
from .weights.layout import WeightsDir


@dataclass
class ImageReady:
    image: np.ndarray  # uint8 [size, size, 3]
    offset: int  # characters of answer text before it
    voken_states: np.ndarray  # float32 [8, H]


@dataclass
class Usage:
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    vokens: int
    images: int
    seed: int
    sampled_tokens: int = 0  # what max_tokens counts: completion_tokens less the 7 forced vokens per image

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Done:
    finish_reason: str
    usage: Usage
    token_ids: list[int]


@dataclass
class Result:
    text: str = ""
    segments: list = field(default_factory=list)  # str and np.ndarray images, in order
    images: list = field(default_factory=list)
    voken_states: list = field(default_factory=list)
    finish_reason: str = ""
    usage: Usage | None = None
    token_ids: list[int] = field(default_factory=list)


class MiniGPT5Pipeline:
    def __init__(
        self,
        weights_dir,
        device: str | None = None,
        dtype: str | None = None,
        vision_dtype: str | None = None,
        image_dtype: str | None = None,
    ):
        self.weights = WeightsDir(weights_dir)
        self.device = resolve_device(device)
        llm_dtype = resolve_dtype(dtype, self.device)
        mapper_unet_vae_dtype = resolve_dtype(image_dtype, self.device, gpu_default="fp16")
        self.prompts = PromptBuilder(self.weights)
        # The vision tower in fp16 on a GPU, as upstream runs it (vit_precision fp16, autocast).
        self.vision = VisionStage.load(
            self.weights, self.device, resolve_dtype(vision_dtype, self.device, gpu_default="fp16")
        )
        self.decoder = DecoderStage.load(self.weights, self.device, llm_dtype)
        self.images = ImageStage.load(self.weights, self.device, mapper_unet_vae_dtype)
        self._ids = itertools.count()

    def request(self, prompt: str, images=None, history: Sequence[Turn] = (), **params) -> GenerationRequest:
        return build_request(prompt, images, history, defaults=self.weights.defaults, **params)

    def stream(self, request: GenerationRequest, on_image_step=None) -> Iterator:
        """TextDelta, ImageReady and finally Done, in answer order (images decoded when their vokens arrive).
        `on_image_step(step, steps)`: called after each diffusion step of each image."""
        prompt_ids = self.prompts.prompt_ids(request)
        image_embeds = self.vision.encode(request.images) if len(request.images) else None
        request_id = f"local-{next(self._ids)}"
        engine = self.decoder.engine
        decode_request = self.decoder.make_request(request_id, prompt_ids, image_embeds, request.sampling)
        engine.submit(decode_request)
        image_index = 0
        while engine.has_work:
            for event in engine.step():
                if isinstance(event, TextDelta):
                    yield event
                elif isinstance(event, VokenStates):
                    job = ImageJob(
                        event.states,
                        image_seed(request.seed, image_index),
                        request.guidance_scale,
                        request.num_inference_steps,
                        request.scheduler,
                    )
                    image_index += 1
                    yield ImageReady(
                        self.images.decode([job], on_image_step)[0], event.text_offset, event.states.numpy()
                    )
                elif isinstance(event, Finished):
                    usage = Usage(
                        decode_request.prompt_tokens,
                        decode_request.image_tokens,
                        event.completion_tokens,
                        event.vokens,
                        event.images,
                        request.seed,
                        sampled_tokens=event.sampled_tokens,
                    )
                    yield Done(event.reason, usage, event.token_ids)

    def run(
        self, prompt: str, images=None, history: Sequence[Turn] = (), on_text=None, on_image_step=None, **params
    ) -> Result:
        result = Result()
        for event in self.stream(self.request(prompt, images, history, **params), on_image_step):
            if isinstance(event, TextDelta):
                result.text += event.text
                if result.segments and isinstance(result.segments[-1], str):
                    result.segments[-1] += event.text
                else:
                    result.segments.append(event.text)
                if on_text:
                    on_text(event.text)
            elif isinstance(event, ImageReady):
                result.images.append(event.image)
                result.voken_states.append(event.voken_states)
                result.segments.append(event.image)
            elif isinstance(event, Done):
                result.finish_reason, result.usage, result.token_ids = event.finish_reason, event.usage, event.token_ids
        return result
