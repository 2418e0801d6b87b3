"""The three served stages, each loadable on its own from a weights directory.

A Triton model loads one stage; the in-process pipeline loads all three. Both call the same
methods, which is what makes the served result equal the in-process one.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch

from .config import NUM_QUERY_TOKENS, NUM_VOKENS
from .engine import DecodeEngine, DecodeRequest
from .fp8 import fp8_available, quantize_llm_fp8
from .image_decoder import ImageDecoder, ImageJob
from .mapper import FeatureMapper
from .prefix_cache import PrefixCache, position_content, tensor_key
from .prompt import prompt_token_ids, render_pieces
from .request import GenerationRequest, InvalidRequest
from .sampling import SamplingParams
from .weights.layout import WeightsDir


class PromptBuilder:
    """Prompt template + tokenizer: GenerationRequest → prompt ids with one placeholder per image."""

    def __init__(self, weights: WeightsDir, tokenizer=None):
        self.tokenizer = tokenizer or weights.tokenizer()
        self.format, self.system = weights.prompt_format
        self.bos_id = weights.tokens["bos_id"]
        self.placeholder_id = weights.tokens["image_placeholder"]
        self.max_positions = weights.arch["llm"]["max_position_embeddings"]

    def pieces(self, request: GenerationRequest) -> list[str | None]:
        """The prompt as text pieces and image slots (prompt.py)."""
        return render_pieces(self.format, self.system, request.turns)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        ids = prompt_token_ids(self.tokenizer, self.pieces(request), self.bos_id, self.placeholder_id)
        positions = len(ids) + len(request.images) * (NUM_QUERY_TOKENS - 1)
        needed = positions + request.sampling.max_tokens + (NUM_VOKENS - 1) * request.sampling.max_images
        if needed > self.max_positions:
            raise InvalidRequest(
                f"text_input: the prompt takes {positions} positions (history and images included); with "
                f"max_tokens={request.sampling.max_tokens} it needs {needed}, the context is {self.max_positions}"
            )
        return ids


class VisionStage:
    def __init__(self, tower):
        self.tower = tower

    @classmethod
    def load(cls, weights: WeightsDir, device: str = "cpu", dtype: torch.dtype = torch.float32) -> VisionStage:
        return cls(weights.load("vision", device, dtype))

    def warmup(self) -> None:
        """One tiny call at load, so the first user does not pay for lazy kernel setup."""
        self.encode(np.zeros((1, 224, 224, 3), dtype=np.uint8))

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, 224, 224, 3] → float32 [N, 32, H] on CPU."""
        pixels = np.require(images, dtype=np.uint8, requirements=["C", "W"])  # torch wants writable memory
        return self.tower(torch.from_numpy(pixels)).float().cpu()


class DecoderStage:
    def __init__(
        self,
        llm,
        tokenizer,
        tokens: dict,
        *,
        prefix_cache_tokens: int = 0,
        prefix_block_tokens: int = 16,
        **engine_options,
    ):
        """`tokens`: the manifest's token ids (`vokens`, `image_placeholder`, `bos_id`, `eos_id`).
        `prefix_cache_tokens` > 0: the engine keeps up to that many positions of prompt KV in blocks of
        `prefix_block_tokens` for later requests (prefix_cache.py)."""
        self.tokenizer = tokenizer
        self.llm = llm
        self.placeholder_id = tokens["image_placeholder"]
        # Never sampled: the placeholder, BOS (`</s>` for VIST checkpoints is EOS itself and stays allowed;
        # the tokenizer's own `<s>` is banned either way) and UNK.
        banned = [tokens["image_placeholder"], tokens["bos_id"], tokenizer.bos_token_id, tokenizer.unk_token_id]
        if prefix_cache_tokens > 0:
            engine_options["prefix_cache"] = PrefixCache(prefix_block_tokens, prefix_cache_tokens)
        self.engine = DecodeEngine(
            llm,
            tokenizer,
            voken_ids=tokens["vokens"],
            eos_id=tokens["eos_id"],
            banned_ids=[i for i in banned if i is not None and i != tokens["eos_id"]],
            **engine_options,
        )

    @classmethod
    def load(
        cls,
        weights: WeightsDir,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: str = "none",
        **engine_options,
    ) -> DecoderStage:
        """`quantization`: none, or fp8 (the decoder layers' weights, fp8.py; H100 or CPU)."""
        llm = weights.load("llm", device, dtype)
        if quantization == "fp8":
            available, why_not = fp8_available(device)
            if not available:
                raise ValueError(f"llm_quantization: fp8 is not available on {device}: {why_not}")
            quantize_llm_fp8(llm)
        elif quantization != "none":
            raise ValueError(f"llm_quantization: must be none or fp8, got {quantization!r}")
        return cls(llm, weights.tokenizer(), weights.tokens, **engine_options)

    def warmup(self) -> None:
        """Prefill and a few decode steps of a throwaway request (greedy, 4 tokens)."""
        request = self.make_request("warmup", [3, 4, 5, 6], None, SamplingParams(max_tokens=4, temperature=0.0))
        self.engine.submit(request)
        while self.engine.has_work:
            self.engine.step()

    @torch.inference_mode()
    def make_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        image_embeds: torch.Tensor | None,
        sampling: SamplingParams,
        image_keys: list[str] | None = None,
    ) -> DecodeRequest:
        """Embed the prompt ids and splice 32 image embeddings in place of each placeholder.
        `image_keys`: a content key per image for the prefix cache (prefix_cache.tensor_key of its
        embeddings, computed here when not given)."""
        ids = torch.tensor(prompt_ids, dtype=torch.long)
        slots = (ids == self.placeholder_id).nonzero().flatten().tolist()
        images = [] if image_embeds is None else list(image_embeds)
        count = len(images)
        if len(slots) != count:
            raise InvalidRequest(f"images: the prompt has {len(slots)} image placeholders but {count} images")
        text_embeds = self.llm.get_input_embeddings()(ids.to(self.llm.device)).float().cpu()
        pieces, start = [], 0
        for slot, image in zip(slots, images):
            pieces += [text_embeds[start:slot], image.float()]
            start = slot + 1
        pieces.append(text_embeds[start:])
        embeds = torch.cat(pieces)
        if image_keys is None:
            image_keys = [tensor_key(image.float()) for image in images]
        if len(image_keys) != count:
            raise InvalidRequest(f"images: {count} images but {len(image_keys)} image keys")
        return DecodeRequest(
            request_id,
            embeds,
            sampling,
            prompt_tokens=len(prompt_ids) - count,
            image_tokens=embeds.shape[0] - len(prompt_ids) + count,
            content=position_content(prompt_ids, self.placeholder_id, image_keys),
        )


class ImageStage:
    def __init__(self, decoder: ImageDecoder):
        self.decoder = decoder

    @classmethod
    def load(cls, weights: WeightsDir, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ImageStage:
        unet = weights.load("unet", device, dtype)
        if str(device).startswith("cuda"):
            # faster convolutions on tensor cores; Module.to takes memory_format, its type stubs do not say so
            unet = unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return cls(
            ImageDecoder(
                cast(FeatureMapper, weights.load("mapper", device, dtype)),
                unet,
                weights.load("vae", device, dtype),
                weights.manifest["scheduler"],
            )
        )

    def warmup(self) -> None:
        hidden = self.decoder.mapper.llm_hidden_size
        self.decode([ImageJob(torch.zeros(NUM_VOKENS, hidden), seed=0, num_inference_steps=1)])

    def decode(self, jobs: list[ImageJob], progress=None) -> np.ndarray:
        """Images for any jobs: grouped by (scheduler, steps), each group decoded as one batch."""
        images: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key, []).append(i)
        for indices in groups.values():
            for i, image in zip(indices, self.decoder.decode([jobs[i] for i in indices], progress)):
                images[i] = image
        return np.stack(images)
