"""Random-weight models for benchmarks: built directly on the target device (never on CPU first),
never read from a hub or a file, and wrapped in the repository's own stage classes.

The LLM vocabulary is LLaMA's 32000 plus the 9 MiniGPT-5 tokens (tiny: 512 + 9). Its tokenizer is a
word-level one over synthetic words `t3`...: it decodes any id, and no sequence of its words spells the
stop text '###', so generation length is set by `max_tokens` alone (EOS is banned as well).
"""

from __future__ import annotations

import torch

from minigpt5 import components
from minigpt5.config import NUM_QUERY_TOKENS, SCHEDULER, VOKEN_TOKENS, preset
from minigpt5.placement import resolve_device, resolve_dtype

BASE_VOCAB = {"full": 32000, "tiny": 512}  # LLaMA's vocabulary; tiny as weights/tiny.py
# What the batching and cache benches ask, in the served prompt template
USER_MESSAGES = (
    "Tell me a story about a cat.",
    "What is in the image? Describe the scene.",
    "Write a short poem about the sea at night.",
    "The family went to the beach. What happened next?",
    "Describe a little house made of bread and sugar.",
    "A cat sits on a red sofa next to a window. Continue.",
    "Explain how a rainbow forms, simply.",
    "Plan a walk through the forest with a dog.",
)
LLM_SIDE = ("vision", "llm")  # built in --dtype; mapper, unet, vae in --image-dtype (as pipeline.py)


def vocab_size(preset_name: str) -> int:
    return BASE_VOCAB[preset_name] + len(VOKEN_TOKENS) + 1


def bench_arch(preset_name: str) -> dict:
    arch = preset(preset_name)
    arch["llm"]["vocab_size"] = vocab_size(preset_name)
    return arch


def bench_tokenizer(preset_name: str):
    """Word-level tokenizer with <unk>/<s>/</s>, synthetic words and the MiniGPT-5 special tokens."""
    from minigpt5.tokenizer import word_level_tokenizer

    fast = word_level_tokenizer(BASE_VOCAB[preset_name])
    assert len(fast) == vocab_size(preset_name), (len(fast), vocab_size(preset_name))
    return fast


def resolve(device: str, dtype: str, image_dtype: str) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """Device and dtypes with the pipeline's defaults (pipeline.py): fp32 on CPU; bf16 LLM side and
    fp16 image side on GPU."""
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    llm_dtype = resolve_dtype(dtype, dev.type)
    if image_dtype in (None, "auto"):
        img_dtype = torch.float32 if dev.type == "cpu" else torch.float16
    else:
        img_dtype = resolve_dtype(image_dtype, dev.type)
    return dev, llm_dtype, img_dtype


def build_module(name: str, arch: dict, device, dtype: torch.dtype) -> torch.nn.Module:
    """One module with random parameters created directly on `device` in `dtype`."""
    with components.building_on(device, dtype):
        module = components.build(name, arch)
    with torch.no_grad():  # learned queries start at zero in the constructors: give them N(0, 0.02)
        for attr in ("query_tokens", "t2i_decoder_prompt"):
            param = getattr(module, attr, None)
            if param is not None and param.device.type != "meta":
                param.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False)


def build_modules(arch: dict, device, llm_dtype, image_dtype, seed: int = 0) -> dict:
    modules = {}
    for index, name in enumerate(components.COMPONENTS):
        torch.manual_seed(seed * 1000 + index)
        modules[name] = build_module(name, arch, device, llm_dtype if name in LLM_SIDE else image_dtype)
    return modules


# ---- parameter counts and bytes -------------------------------------------------------------------
def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def parameter_counts(modules: dict) -> dict:
    """Parameters per component; the vision tower is split into ViT (with ln_vision), Q-Former (with
    its 32 query tokens) and llama_proj."""
    vision = modules["vision"]
    counts = {
        "vision_vit": _count(vision.vision_model),
        "qformer": _count(vision.qformer) + vision.query_tokens.numel(),
        "llama_proj": _count(vision.llama_proj),
        "llm": _count(modules["llm"]),
        "mapper": _count(modules["mapper"]),
        "unet": _count(modules["unet"]),
        "vae": _count(modules["vae"]),
    }
    counts["total"] = sum(counts.values())
    return counts


def meta_parameter_counts(preset_name: str) -> dict:
    """`parameter_counts` of a preset built on the meta device: no memory is allocated."""
    arch = bench_arch(preset_name)
    return parameter_counts({name: build_module(name, arch, "meta", torch.float32) for name in components.COMPONENTS})


def llm_bytes(llm) -> dict:
    """Weight bytes of the LLM, and the bytes one decode step must read: every parameter except the
    input-embedding table, of which a step reads one row per token."""
    total = sum(p.numel() * p.element_size() for p in llm.parameters())
    embed = llm.get_input_embeddings().weight
    return {"weight_bytes": total, "read_per_step_bytes": total - embed.numel() * embed.element_size()}


def kv_bytes_per_position(llm) -> int:
    config = llm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * llm.dtype.itemsize


# ---- the repository's stages around prebuilt modules ---------------------------------------------
def token_ids(tokenizer) -> dict:
    from minigpt5.tokenizer import special_token_ids

    ids = special_token_ids(tokenizer)
    return {
        "vokens": ids["vokens"],
        "image_placeholder": ids["image_placeholder"],
        "bos_id": ids["bos"]["<s>"],
        "eos_id": ids["eos"],
    }


def make_stages(modules: dict, tokenizer, *, scheduler_config: dict = SCHEDULER, **engine_options) -> dict:
    """VisionStage, DecoderStage and ImageStage over prebuilt modules, with the bench's EOS ban."""
    from minigpt5.image_decoder import ImageDecoder
    from minigpt5.stages import ImageStage, VisionStage

    tokens = token_ids(tokenizer)
    vision = VisionStage(modules["vision"])
    decoder = make_decoder(modules["llm"], tokenizer, tokens, **engine_options)
    images = ImageStage(ImageDecoder(modules["mapper"], modules["unet"], modules["vae"], scheduler_config))
    return {"vision": vision, "decoder": decoder, "images": images, "tokens": tokens}


def make_decoder(llm, tokenizer, tokens: dict, **engine_options):
    """A DecoderStage whose engine can never sample EOS: runs have a fixed length ('###' cannot be
    spelled by the bench vocabulary either)."""
    from minigpt5.stages import DecoderStage

    decoder = DecoderStage(llm, tokenizer, tokens, **engine_options)
    decoder.engine.banned_ids = sorted(set(decoder.engine.banned_ids) | {tokens["eos_id"]})
    return decoder


def prompt_ids(tokens: dict, positions: int, base_vocab: int, seed: int = 0, with_image: bool = True) -> list[int]:
    """BOS + random text ids (+ one image placeholder after a system-prompt-sized head) such that the
    prompt takes `positions` KV positions once the image's 32 embeddings are spliced in."""
    text = max(positions - 1 - (NUM_QUERY_TOKENS if with_image else 0), 2)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, base_vocab, (text,), generator=generator).tolist()
    if with_image:
        ids.insert(min(45, len(ids) - 1), tokens["image_placeholder"])  # after ~the system prompt
    return [tokens["bos_id"], *ids]
