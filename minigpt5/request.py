"""What a user may ask for, checked in one place: the served BLS model and the in-process pipeline
both build a `GenerationRequest` here, so both accept and refuse exactly the same things.

Every refusal is an `InvalidRequest` whose message names the field and the limit (docs/LIMITS.md
is generated from `LIMITS`).
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from dataclasses import dataclass, field

import numpy as np

from minigpt5_client.contract import INPUT

from .config import VISION_IMAGE_SIZE
from .errors import InvalidRequest
from .image_decoder import SCHEDULERS
from .prompt import Turn, check_markers, parse_history
from .sampling import FORCE_IMAGE_MODES, SamplingParams


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 16_000
    max_history_turns: int = 32
    max_history_chars: int = 64_000
    max_images: int = 8  # input images per request, all turns together
    max_output_images: int = 8  # `max_images`: images generated in one answer
    max_image_bytes: int = 20 * 1024 * 1024  # one encoded image
    max_image_pixels: int = 40_000_000  # declared width × height of an encoded image
    max_tokens: int = 1024
    temperature: tuple = (0.0, 5.0)
    top_p: tuple = (0.0, 1.0)  # exclusive of 0
    max_top_k: int = 1000
    repetition_penalty: tuple = (1.0, 10.0)
    guidance_scale: tuple = (0.0, 30.0)
    num_inference_steps: tuple = (1, 200)


LIMITS = Limits()


@dataclass
class GenerationRequest:
    prompt: str
    images: np.ndarray  # uint8 [N, 224, 224, 3], all turns' images in prompt order
    history: list[Turn] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"
    stream: bool = False

    @property
    def turns(self) -> list[Turn]:
        """History plus this turn; this turn takes the images not claimed by history."""
        claimed = sum(t.num_images for t in self.history)
        return [*self.history, Turn("human", self.prompt, len(self.images) - claimed)]

    @property
    def seed(self) -> int:
        seed = self.sampling.seed
        if seed is None:  # build_request always draws one
            raise ValueError("a GenerationRequest without a seed")
        return seed


def _number(name: str, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequest(f"{name}: must be a number, got {type(value).__name__}")
    value = kind(value) if kind is float else value
    if kind is int and float(value) != int(value):
        raise InvalidRequest(f"{name}: must be an integer, got {value}")
    if kind is float and not math.isfinite(value):
        raise InvalidRequest(f"{name}: must be finite, got {value}")
    return kind(value)


def _in_range(name: str, value, low, high, *, low_open: bool = False):
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidRequest(f"{name}: must be in {bracket}{low}, {high}], got {value}")
    return value


def build_request(
    prompt,
    images=None,
    history=(),
    *,
    defaults: dict,
    limits: Limits = LIMITS,
    max_tokens=None,
    temperature=None,
    top_p=None,
    top_k=None,
    repetition_penalty=None,
    random_seed=None,
    force_image=None,
    force_image_mode=None,
    max_images=None,
    guidance_scale=None,
    num_inference_steps=None,
    scheduler=None,
    stream=None,
) -> GenerationRequest:
    """Validate user values (None = default) into a GenerationRequest, or raise InvalidRequest."""

    def pick(value, key):
        return defaults[key] if value is None else value

    if not isinstance(prompt, str):
        raise InvalidRequest("text_input: must be a UTF-8 string")
    if not prompt.strip():
        raise InvalidRequest("text_input: must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(f"text_input: {len(prompt)} characters, the limit is {limits.max_prompt_chars}")
    history = list(history)
    if len(history) > limits.max_history_turns:
        raise InvalidRequest(f"history: {len(history)} turns, the limit is {limits.max_history_turns}")
    if sum(len(t.text) for t in history) > limits.max_history_chars:
        raise InvalidRequest(f"history: more than {limits.max_history_chars} characters of text")

    images = _check_images(images, limits)
    claimed = sum(t.num_images for t in history)
    if claimed > len(images):
        raise InvalidRequest(f"history: its turns name {claimed} images but the request has {len(images)}")

    max_tokens = _in_range(
        "max_tokens", _number("max_tokens", pick(max_tokens, "max_tokens"), int), 1, limits.max_tokens
    )
    max_images = _in_range(
        "max_images", _number("max_images", pick(max_images, "max_images"), int), 0, limits.max_output_images
    )
    force_image = bool(pick(force_image, "force_image"))
    force_image_mode = pick(force_image_mode, "force_image_mode")
    if force_image_mode not in FORCE_IMAGE_MODES:
        raise InvalidRequest(f"force_image_mode: must be one of {list(FORCE_IMAGE_MODES)}, got {force_image_mode!r}")
    if force_image and max_images < 1:
        raise InvalidRequest("max_images: must be >= 1 with force_image")
    if force_image and max_tokens < max_images:
        raise InvalidRequest(
            f"max_tokens: must be >= max_images ({max_images}) with force_image "
            f"(each image's [IMG0] is one sampled token)"
        )
    seed = secrets.randbits(63) if random_seed is None else _number("random_seed", random_seed, int)
    if seed < 0:
        raise InvalidRequest(f"random_seed: must be >= 0, got {seed}")
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=_in_range(
            "temperature", _number("temperature", pick(temperature, "temperature")), *limits.temperature
        ),
        top_p=_in_range("top_p", _number("top_p", pick(top_p, "top_p")), *limits.top_p, low_open=True),
        top_k=_in_range("top_k", _number("top_k", pick(top_k, "top_k"), int), 0, limits.max_top_k),
        repetition_penalty=_in_range(
            "repetition_penalty",
            _number("repetition_penalty", pick(repetition_penalty, "repetition_penalty")),
            *limits.repetition_penalty,
        ),
        seed=seed % (2**63),
        force_image=force_image,
        force_image_mode=force_image_mode,
        max_images=max_images,
    )
    scheduler = pick(scheduler, "scheduler")
    if scheduler not in SCHEDULERS:
        raise InvalidRequest(f"scheduler: must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    request = GenerationRequest(
        prompt=prompt,
        images=images,
        history=history,
        sampling=sampling,
        guidance_scale=_in_range(
            "guidance_scale", _number("guidance_scale", pick(guidance_scale, "guidance_scale")), *limits.guidance_scale
        ),
        num_inference_steps=_in_range(
            "num_inference_steps",
            _number("num_inference_steps", pick(num_inference_steps, "num_inference_steps"), int),
            *limits.num_inference_steps,
        ),
        scheduler=scheduler,
        stream=bool(stream) if stream is not None else False,
    )
    check_markers(request.turns)  # one <image> marker per image of a turn that uses them
    return request


def _check_images(images, limits: Limits) -> np.ndarray:
    shape = (VISION_IMAGE_SIZE, VISION_IMAGE_SIZE, 3)
    if images is None or len(images) == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        raise InvalidRequest(
            f"images: must be UINT8 [N, {shape[0]}, {shape[1]}, 3], got {images.dtype} {list(images.shape)}"
        )
    if len(images) > limits.max_images:
        raise InvalidRequest(f"images: {len(images)} images, the limit is {limits.max_images}")
    return images


# ---- from the served model's inputs ------------------------------------------------------------------
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM")


def request_from_inputs(
    scalars: dict, images: np.ndarray | None, image_bytes: list[bytes], *, defaults: dict, limits: Limits = LIMITS
) -> GenerationRequest:
    """The served model's inputs (None = absent) as a GenerationRequest, or InvalidRequest."""
    params = dict(scalars)
    text, history, mode = params.pop("text_input"), params.pop("history"), params.pop("image_preprocess")
    if text is None:
        raise InvalidRequest("text_input: required")
    return build_request(
        text,
        request_images(images, image_bytes, mode, limits),
        parse_history(history),
        defaults=defaults,
        limits=limits,
        **params,
    )


def request_images(
    images: np.ndarray | None, image_bytes: list[bytes], mode: str | None, limits: Limits = LIMITS
) -> np.ndarray | None:
    """`images` (pre-processed uint8) first, then the decoded `image_bytes`, in order."""
    from minigpt5_client.errors import ImageError
    from minigpt5_client.preprocess import preprocess_image

    arrays = []
    if images is not None and images.size:
        arrays += list(_check_images(images, limits))
    if len(arrays) + len(image_bytes) > limits.max_images:
        raise InvalidRequest(f"images: {len(arrays) + len(image_bytes)} images, the limit is {limits.max_images}")
    mode = mode or "pad"
    if mode not in INPUT["image_preprocess"].choices:
        raise InvalidRequest(f"image_preprocess: must be 'pad' or 'crop', got {mode!r}")
    for index, data in enumerate(image_bytes):
        try:
            arrays.append(
                preprocess_image(
                    _encoded_image(data, index),
                    mode,
                    max_file_bytes=limits.max_image_bytes,
                    max_pixels=limits.max_image_pixels,
                )
            )
        except ImageError as exc:
            raise InvalidRequest(f"image_bytes[{index}]: {exc}") from None
    return np.stack(arrays) if arrays else None


def _encoded_image(data: bytes, index: int) -> bytes:
    """Raw encoded bytes, or base64 text of them (optionally as a data: URI), as JSON clients send."""
    if data.startswith(IMAGE_MAGIC):
        return data
    if data[:5].lower() == b"data:" and b"," in data:
        data = data.split(b",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"image_bytes[{index}]: neither an encoded image (PNG/JPEG/GIF/WebP/BMP) nor base64 of one"
        ) from None
