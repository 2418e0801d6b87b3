"""`minigpt5 weights convert`: upstream MiniGPT-5 files → the weights layout (layout.py).

Sources, in precedence order (a later source overrides an earlier one for the same tensor):

    --vicuna         HF LLaMA folder                    → llm (base weights), tokenizer, llm config
    --stage1         MiniGPT-5 stage-1 Lightning .ckpt  → llm embed_tokens/lm_head, mapper
    --stage2         MiniGPT-5 stage-2 Lightning .ckpt  → llm (LoRA merged, PEFT copies), mapper transformer
    --blip2          LAVIS .pth or HF Blip2 folder      → vision (Q-Former, query_tokens, ln_vision[, ViT])
    --eva-vit        LAVIS eva_vit_g.pth                → vision (ViT)
    --minigpt4-proj  MiniGPT-4 .pth                     → vision llama_proj
    --sd             diffusers SD 2.1-base folder       → unet, vae

Upstream key names are inferred from upstream code (docs/CONVERT.md), so nothing is renamed by
guesswork: every source key must match one of the explicit rules below, else it is *unknown* and
reported by name; every tensor the modules need that no source supplies is *missing*, reported by
name. Shapes are checked before any tensor data is read. Pickles are only opened with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import pickle
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .. import components
from ..config import IMAGE_PLACEHOLDER, UPSTREAM_LORA_ALPHA, VOKEN_TOKENS, preset
from ..tokenizer import add_minigpt5_tokens, load_tokenizer
from .layout import make_manifest, save_weights

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ConversionError(Exception):
    """An input problem the user must fix; the message names the files and keys involved."""


@dataclass
class ConvertOptions:
    stage1: Path
    vicuna: Path
    blip2: Path
    minigpt4_proj: Path
    sd: Path
    out: Path
    stage2: Path | None = None
    eva_vit: Path | None = None
    bos: str | None = None  # None: the BOS the prompt format's checkpoint was trained with
    prompt_format: str | None = None  # None: mmdialog if the stage-2 file's name says so, else vist
    dtype: str = "fp16"
    preset: str = "full"
    lora_alpha: float = UPSTREAM_LORA_ALPHA
    allow_unknown: bool = False

    @classmethod
    def from_namespace(cls, args) -> ConvertOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------
# Key rules. A rule's target is "component:name", written as a re.Match.expand template; a
# "#part" suffix marks a piece combined with others into one tensor (EVA q/v biases, LoRA A/B).
# A rule without target marks keys that are known but unused; they are counted in the report.


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | None
    ignored_because: str = ""
    applies: Callable[[re.Match], bool] = lambda match: True


_LIGHTNING_LLAMA = r"(?:model\.)?llama_model\.(?:base_model\.model\.)?"  # Lightning attr, MiniGPT5 attr, PEFT wrapper
_PEFT_COPY = r"(?:modules_to_save\.default\.)?"

STAGE_RULES = (
    Rule(
        _LIGHTNING_LLAMA + r"(model\.embed_tokens|lm_head)\.original_module\.weight",
        None,
        "PEFT's frozen copy of the pre-LoRA rows; the modules_to_save copy is the trained one",
    ),
    Rule(_LIGHTNING_LLAMA + r"model\.embed_tokens\." + _PEFT_COPY + r"weight", r"llm:model.embed_tokens.weight"),
    Rule(_LIGHTNING_LLAMA + r"lm_head\." + _PEFT_COPY + r"weight", r"llm:lm_head.weight"),
    Rule(
        _LIGHTNING_LLAMA + r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\.lora_([AB])(?:\.default)?\.weight",
        r"llm:model.layers.\1.\2.weight#lora_\3",
    ),
    Rule(r"(?:model\.)?(fc\.\d+\.(?:weight|bias)|llm_to_t2i_mapping\..+|t2i_decoder_prompt)", r"mapper:\1"),
)

VICUNA_RULES = (
    Rule(
        r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
        None,
        "rotary buffer saved by old transformers; recomputed from the config",
    ),
    Rule(r"(model\..+|lm_head\.weight)", r"llm:\1"),
)

HF_BLIP2_RULES = (
    Rule(
        r"(language_model|language_projection)\..+",
        None,
        "BLIP-2's own language model and projection; MiniGPT-5 uses Vicuna and llama_proj",
    ),
    Rule(r"(vision_model\..+|qformer\..+|query_tokens)", r"vision:\1"),
)

_EVA = r"(?:visual_encoder\.)?"  # the ViT is prefixed inside a BLIP-2 checkpoint, bare in eva_vit_g.pth
_QFORMER_LAYER = r"Qformer\.bert\.encoder\.layer\.(\d+)\."


def lavis_rules(vision_depth: int) -> tuple[Rule, ...]:
    """LAVIS EVA ViT-g + BLIP-2 Q-Former names → transformers Blip2VisionModel / Blip2QFormerModel names
    (the mapping of transformers' convert_blip_2_original_to_pytorch.py)."""
    layer = r"vision:vision_model.encoder.layers.\1."
    return (
        Rule(
            _EVA + r"blocks\.(\d+)\..+",
            None,
            "ViT blocks beyond the configured depth (BLIP-2 drops EVA's last block; LAVIS loads non-strictly)",
            applies=lambda match: int(match[1]) >= vision_depth,
        ),
        Rule(_EVA + r"cls_token", r"vision:vision_model.embeddings.class_embedding"),
        Rule(_EVA + r"pos_embed", r"vision:vision_model.embeddings.position_embedding"),
        Rule(_EVA + r"patch_embed\.proj\.(weight|bias)", r"vision:vision_model.embeddings.patch_embedding.\1"),
        Rule(_EVA + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", layer + r"layer_norm\2.\3"),
        Rule(_EVA + r"blocks\.(\d+)\.attn\.qkv\.weight", layer + r"self_attn.qkv.weight"),
        # EVA has no k bias: qkv.bias = cat(q_bias, 0, v_bias), assembled from these two parts.
        Rule(_EVA + r"blocks\.(\d+)\.attn\.([qv])_bias", layer + r"self_attn.qkv.bias#\2_bias"),
        Rule(_EVA + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", layer + r"self_attn.projection.\2"),
        Rule(_EVA + r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", layer + r"mlp.\2.\3"),
        Rule(r"ln_vision\.(weight|bias)", r"vision:vision_model.post_layernorm.\1"),
        Rule(r"query_tokens", r"vision:query_tokens"),
        Rule(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"vision:qformer.layernorm.\1"),
        Rule(
            _QFORMER_LAYER + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
            r"vision:qformer.encoder.layer.\1.\2.attention.\3.\4",
        ),
        Rule(
            _QFORMER_LAYER + r"((?:attention|crossattention)\.output|intermediate_query|output_query)\.(.+)",
            r"vision:qformer.encoder.layer.\1.\2.\3",
        ),
        Rule(
            r"Qformer\.bert\.embeddings\.(word_embeddings\.weight|position_embeddings\.weight|position_ids)",
            None,
            "Q-Former text embeddings; query tokens do not use them (MiniGPT-4 deletes them)",
        ),
        Rule(
            _QFORMER_LAYER + r"(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)",
            None,
            "Q-Former text FFN; query tokens use the *_query FFN (MiniGPT-4 deletes it)",
        ),
        Rule(r"Qformer\.cls\..+", None, "Q-Former masked-LM head (MiniGPT-4 deletes it)"),
        Rule(r"(t5_proj|opt_proj)\.(weight|bias)", None, "BLIP-2's projection to its own language model"),
    )


PROJ_RULES = (Rule(r"llama_proj\.(weight|bias)", r"vision:llama_proj.\1"),)

UNET_RULES = (Rule(r"(.+)", r"unet:\1"),)

VAE_RULES = (
    # diffusers' pre-0.14 names of the VAE mid-block attention (renamed by diffusers on load too).
    *(
        Rule(
            r"((?:encoder|decoder)\.mid_block\.attentions\.\d+)\." + old + r"\.(weight|bias)", r"vae:\1." + new + r".\2"
        )
        for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
    ),
    Rule(r"(.+)", r"vae:\1"),
)


# ---------------------------------------------------------------------------------------------
# Reading sources: every tensor is described by its shape and read only when saved.


@dataclass
class Pending:
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    origin: str  # "source:key", for messages


@dataclass
class Source:
    label: str  # the CLI flag it came from, e.g. "--stage1", "--sd unet"
    path: Path
    rules: tuple[Rule, ...]
    tensors: dict[str, Pending]


def load_pickle(path: Path):
    """torch.load with weights_only=True (refuses anything but tensors and plain containers)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # pre-zipfile pickles cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ConversionError(
            f"{path}: refused by torch.load(weights_only=True), it holds more than tensors and plain "
            f"containers ({reason}). If you trust the file, re-save only its state dict in an isolated "
            f"environment (docs/CONVERT.md)."
        ) from None


def _state_dict_of(obj, path: Path) -> dict:
    """The tensor dict inside a checkpoint container: Lightning {"state_dict": ...}, LAVIS {"model": ...} or bare."""
    for container in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, not_tensors))}")
    return obj


def read_tensor_files(label: str, paths: list[Path]) -> dict[str, Pending]:
    tensors: dict[str, Pending] = {}
    for path in paths:
        for key, pending in _read_tensor_file(label, path).items():
            if key in tensors:
                raise ConversionError(f"{label}: {key} is stored twice ({tensors[key].origin}, {path})")
            tensors[key] = pending
    return tensors


def _read_tensor_file(label: str, path: Path) -> dict[str, Pending]:
    if not path.is_file():
        raise ConversionError(f"{label} {path}: no such file")
    if path.suffix == ".safetensors":
        handle = safe_open(str(path), framework="pt")
        return {
            key: Pending(
                tuple(handle.get_slice(key).get_shape()), functools.partial(handle.get_tensor, key), f"{label}:{key}"
            )
            for key in handle.keys()
        }
    state = _state_dict_of(load_pickle(path), path)
    return {key: Pending(tuple(t.shape), _already_loaded(t), f"{label}:{key}") for key, t in state.items()}


def _already_loaded(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


TRANSFORMERS_FILES = ("model*.safetensors", "pytorch_model*.bin")
DIFFUSERS_FILES = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")


def _weight_files(folder: Path, patterns: tuple[str, str]) -> list[Path]:
    """A transformers/diffusers folder's weight files: safetensors if any, else .bin pickles; diffusers'
    `.fp16.` variant files only when there is no full-precision file."""
    for pattern in patterns:
        files = sorted(p for p in folder.glob(pattern) if ".fp16." not in p.name) or sorted(folder.glob(pattern))
        if files:
            return files
    raise ConversionError(f"{folder}: no {' or '.join(patterns)}")


def _listed(path: Path | None) -> list[Path]:
    return [] if path is None else [path]


def open_sources(opts: ConvertOptions, arch: dict) -> list[Source]:
    """The sources in precedence order (module docstring), each with its key rules."""
    lavis = lavis_rules(arch["vision"]["num_hidden_layers"])
    blip2_is_hf = opts.blip2.is_dir()
    specs: list[tuple[str, Path | None, tuple[Rule, ...], list[Path]]] = [
        ("--vicuna", opts.vicuna, VICUNA_RULES, _weight_files(opts.vicuna, TRANSFORMERS_FILES)),
        ("--stage1", opts.stage1, STAGE_RULES, [opts.stage1]),
        ("--stage2", opts.stage2, STAGE_RULES, _listed(opts.stage2)),
        (
            "--blip2",
            opts.blip2,
            HF_BLIP2_RULES if blip2_is_hf else lavis,
            _weight_files(opts.blip2, TRANSFORMERS_FILES) if blip2_is_hf else [opts.blip2],
        ),
        ("--eva-vit", opts.eva_vit, lavis, _listed(opts.eva_vit)),
        ("--minigpt4-proj", opts.minigpt4_proj, PROJ_RULES, [opts.minigpt4_proj]),
        ("--sd unet", opts.sd / "unet", UNET_RULES, _weight_files(opts.sd / "unet", DIFFUSERS_FILES)),
        ("--sd vae", opts.sd / "vae", VAE_RULES, _weight_files(opts.sd / "vae", DIFFUSERS_FILES)),
    ]
    return [
        Source(label, path, rules, read_tensor_files(label, files))
        for label, path, rules, files in specs
        if path is not None
    ]


# ---------------------------------------------------------------------------------------------
# Architecture: from the source configs where upstream has one, else from the preset.

LLM_FIXED_FIELDS = ("hidden_act", "rope_parameters", "attention_bias", "mlp_bias", "head_dim")


def architecture(opts: ConvertOptions) -> dict:
    arch = preset(opts.preset)  # vision, qformer and mapper: LAVIS and Lightning files carry no config
    arch["llm"] = llm_architecture(opts.vicuna, keys=arch["llm"])
    if opts.blip2.is_dir():
        arch["vision"], arch["qformer"] = blip2_architecture(opts.blip2, arch["vision"], arch["qformer"])
    from diffusers import AutoencoderKL, UNet2DConditionModel

    arch["unet"] = diffusers_architecture(UNet2DConditionModel, opts.sd / "unet")
    arch["vae"] = diffusers_architecture(AutoencoderKL, opts.sd / "vae")
    if arch["mapper"]["d_model"] != arch["unet"]["cross_attention_dim"]:
        raise ConversionError(
            f"mapper d_model {arch['mapper']['d_model']} (preset {opts.preset!r}) != UNet "
            f"cross_attention_dim {arch['unet']['cross_attention_dim']} ({opts.sd / 'unet'})"
        )
    return arch


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json")
    return json.loads(path.read_text())


def llm_architecture(folder: Path, keys) -> dict:
    """The LLaMA fields the manifest carries; fields it does not carry must have LlamaConfig's defaults."""
    from transformers import LlamaConfig

    raw = _read_config(folder)
    if raw.get("model_type") != "llama":
        raise ConversionError(f"{folder}/config.json: model_type {raw.get('model_type')!r}, expected 'llama'")
    config = LlamaConfig(**raw)
    llm = {key: getattr(config, key) for key in keys}
    default = LlamaConfig(**llm)
    unsupported = [f"{f}={getattr(config, f)!r}" for f in LLM_FIXED_FIELDS if getattr(config, f) != getattr(default, f)]
    if unsupported:
        raise ConversionError(f"{folder}/config.json: unsupported LLaMA variant ({', '.join(unsupported)})")
    return llm


def blip2_architecture(folder: Path, vision_keys, qformer_keys) -> tuple[dict, dict]:
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    raw = _read_config(folder)
    vision = Blip2VisionConfig(**raw.get("vision_config", {}))
    qformer = Blip2QFormerConfig(**raw.get("qformer_config", {}))
    return ({k: getattr(vision, k) for k in vision_keys}, {k: getattr(qformer, k) for k in qformer_keys})


def diffusers_architecture(model_class, folder: Path) -> dict:
    """config.json minus diffusers' bookkeeping (`_class_name`, ...): the constructor's keyword arguments."""
    accepted = inspect.signature(model_class.__init__).parameters
    return {k: v for k, v in _read_config(folder).items() if k in accepted and k != "self"}


def expected_shapes(arch: dict, vocab_size: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every component's state_dict keys and shapes (modules built on the meta device: no memory)."""
    arch = json.loads(json.dumps(arch))
    arch["llm"]["vocab_size"] = vocab_size
    shapes = {}
    for name in components.COMPONENTS:
        with components.building_on("meta"):
            module = components.build(name, arch)
        shapes[name] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return shapes


# ---------------------------------------------------------------------------------------------
# Routing keys through rules, then combining sources.


@dataclass
class Routed:
    source: Source
    targets: dict[tuple[str, str], str] = field(default_factory=dict)  # (component, name[#part]) → source key
    ignored: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason → keys
    unknown: list[str] = field(default_factory=list)


def route(source: Source, expected: dict) -> Routed:
    routed = Routed(source)
    for key in sorted(source.tensors):
        rule, match = _first_rule(source.rules, key)
        if rule is None:
            routed.unknown.append(key)
        elif rule.target is None:
            routed.ignored[rule.ignored_because].append(key)
        else:
            component, name = match.expand(rule.target).split(":", 1)
            if name.split("#")[0] not in expected[component]:
                routed.unknown.append(key)
            elif (component, name) in routed.targets:
                raise ConversionError(
                    f"{source.label} {source.path}: {routed.targets[component, name]} and "
                    f"{key} both give {component} {name}"
                )
            else:
                routed.targets[component, name] = key
    return routed


def _first_rule(rules, key):
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match and rule.applies(match):
            return rule, match
    return None, None


def check_unknown(routes: list[Routed], allow_unknown: bool) -> None:
    if allow_unknown or not any(r.unknown for r in routes):
        return
    raise ConversionError(
        "unknown keys (no conversion rule; pass --allow-unknown to skip them):\n"
        + "\n".join(f"  {r.source.label} {r.source.path}: {key}" for r in routes for key in r.unknown)
    )


def combine(routes: list[Routed]) -> tuple[dict[str, dict[str, Pending]], dict[str, int]]:
    """Per component: name[#part] → tensor, a later source overriding an earlier one; and override counts."""
    merged: dict[str, dict[str, Pending]] = defaultdict(dict)
    overrides: dict[str, int] = defaultdict(int)
    for routed in routes:
        for (component, name), key in routed.targets.items():
            previous = merged[component].get(name)
            if previous is not None:
                overrides[f"{routed.source.label} over {previous.origin.split(':')[0]}"] += 1
            merged[component][name] = routed.source.tensors[key]
    return merged, dict(overrides)


def assemble(parts: dict[str, Pending], lora_alpha: float) -> tuple[dict[str, Pending], list[int]]:
    """Combine "#part" entries: EVA q/v biases into qkv.bias, LoRA A/B merged into their base weight.
    Returns the final tensors and the rank of each merged LoRA."""
    final = {name: p for name, p in parts.items() if "#" not in name}
    grouped: dict[str, dict[str, Pending]] = defaultdict(dict)
    for name, pending in parts.items():
        if "#" in name:
            base, part = name.split("#")
            grouped[base][part] = pending
    ranks = []
    for base, pieces in grouped.items():
        if "q_bias" in pieces or "v_bias" in pieces:
            final[base] = _qkv_bias(base, pieces)
        else:
            final[base], rank = _merge_lora(base, final.get(base), pieces, lora_alpha)
            ranks.append(rank)
    return final, ranks


def _require(base: str, pieces: dict, names: tuple[str, ...]) -> None:
    absent = [n for n in names if n not in pieces]
    if absent:
        present = ", ".join(p.origin for p in pieces.values())
        raise ConversionError(f"{base}: missing {' and '.join(absent)} (have {present})")


def _qkv_bias(base: str, pieces: dict[str, Pending]) -> Pending:
    _require(base, pieces, ("q_bias", "v_bias"))
    q, v = pieces["q_bias"], pieces["v_bias"]
    if q.shape != v.shape:
        raise ConversionError(f"{base}: {q.origin} shape {q.shape} != {v.origin} shape {v.shape}")

    def load():
        q_bias, v_bias = q.load(), v.load()
        return torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])

    return Pending((3 * q.shape[0],), load, f"{q.origin} + {v.origin}")


def _merge_lora(base: str, weight: Pending | None, pieces: dict[str, Pending], alpha: float) -> tuple[Pending, int]:
    """W + (alpha / r) · B @ A, computed in fp32 (PEFT's merge for a non-fan-in-fan-out Linear)."""
    _require(base, pieces, ("lora_A", "lora_B"))
    a, b = pieces["lora_A"], pieces["lora_B"]
    if weight is None:
        raise ConversionError(f"{base}: LoRA {a.origin} has no base weight to merge into")
    rank = a.shape[0]
    if len(a.shape) != 2 or b.shape != (weight.shape[0], rank) or a.shape[1] != weight.shape[1]:
        raise ConversionError(f"{base}: LoRA shapes A {a.shape}, B {b.shape} do not fit the weight {weight.shape}")

    def load():
        return weight.load().float() + (alpha / rank) * (b.load().float() @ a.load().float())

    return Pending(weight.shape, load, f"{weight.origin} + LoRA({a.origin}, {b.origin})"), rank


def check_complete(tensors: dict[str, dict[str, Pending]], expected: dict, vocab_size: int) -> None:
    missing = [f"  {c}: {name}" for c in components.COMPONENTS for name in expected[c] if name not in tensors[c]]
    if missing:
        raise ConversionError("missing tensors (no source supplies them):\n" + "\n".join(missing))
    wrong = [
        f"  {c}: {name} from {p.origin} has shape {list(p.shape)}, the model needs {list(expected[c][name])}"
        for c in components.COMPONENTS
        for name, p in tensors[c].items()
        if p.shape != expected[c][name]
    ]
    if wrong:
        rows = {tensors["llm"][n].shape[0] for n in ("model.embed_tokens.weight", "lm_head.weight")}
        hint = (
            f"\n  (the tokenizer has {vocab_size} tokens after adding the MiniGPT-5 tokens; the checkpoint's "
            f"embedding has {sorted(rows)} rows: wrong Vicuna tokenizer or stage-1 file?)"
            if rows != {vocab_size}
            else ""
        )
        raise ConversionError("shape mismatches (wrong --preset or mismatched files?):\n" + "\n".join(wrong) + hint)


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def vicuna_tokenizer(folder: Path):
    """The Vicuna tokenizer plus [IMG0]..[IMG7], <ImageHere>, which must take the ids right after the
    base vocabulary, in that order (the rows stage 1 trained)."""
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, ImportError) as err:  # ImportError: a sentencepiece-only folder without sentencepiece
        raise ConversionError(f"--vicuna {folder}: cannot load its tokenizer: {err}") from None
    base_size = len(tokenizer)
    add_minigpt5_tokens(tokenizer)
    ids = tokenizer.convert_tokens_to_ids([*VOKEN_TOKENS, IMAGE_PLACEHOLDER])
    if ids != list(range(base_size, base_size + len(ids))):
        raise ConversionError(
            f"--vicuna {folder}: the tokenizer already holds some MiniGPT-5 tokens "
            f"(ids {ids}); upstream added all 9 after the base vocabulary"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The conversion.


@dataclass
class ConversionReport:
    out: Path
    matched: dict[str, int]
    ignored: dict[str, dict[str, int]]
    unknown: dict[str, list[str]]
    overrides: dict[str, int]
    lora: dict

    def lines(self) -> list[str]:
        lines = [f"wrote {self.out}"]
        for source, count in self.matched.items():
            lines.append(f"  {source}: {count} tensors used")
            lines += [f"      {n} ignored: {reason}" for reason, n in self.ignored.get(source, {}).items()]
        lines += [f"  {pair}: {n} tensors replaced" for pair, n in self.overrides.items()]
        if self.lora["merged"]:
            lines.append(
                f"  LoRA merged into {self.lora['merged']} weights (r={self.lora['ranks']}, alpha={self.lora['alpha']})"
            )
        lines += [f"  WARNING unknown key skipped: {s} {k}" for s, keys in self.unknown.items() for k in keys]
        return lines


@dataclass
class Plan:
    """What a conversion writes: the manifest and, per module, every tensor as a Pending (nothing read yet)."""

    manifest: dict
    tokenizer: object
    tensors: dict[str, dict[str, Pending]]
    report: ConversionReport


def plan(opts: ConvertOptions) -> Plan:
    """Read the sources' keys and shapes, route them, check them: everything but reading tensor data."""
    tokenizer = vicuna_tokenizer(opts.vicuna)
    arch = architecture(opts)
    expected = expected_shapes(arch, len(tokenizer))
    routes = [route(source, expected) for source in open_sources(opts, arch)]
    check_unknown(routes, opts.allow_unknown)
    parts, overrides = combine(routes)
    tensors, ranks = {}, []
    for name in components.COMPONENTS:
        tensors[name], merged_ranks = assemble(parts[name], opts.lora_alpha)
        ranks += merged_ranks
    check_complete(tensors, expected, len(tokenizer))
    manifest = make_manifest(
        arch, tokenizer, bos=opts.bos, prompt_format=prompt_format(opts), source=_provenance(opts, set(ranks))
    )
    report = ConversionReport(
        out=opts.out,
        matched={r.source.label: len(r.targets) for r in routes},
        ignored={r.source.label: {why: len(keys) for why, keys in r.ignored.items()} for r in routes if r.ignored},
        unknown={r.source.label: r.unknown for r in routes if r.unknown},
        overrides=overrides,
        lora={"merged": len(ranks), "ranks": sorted(set(ranks)), "alpha": opts.lora_alpha},
    )
    return Plan(manifest, tokenizer, tensors, report)


def convert(opts: ConvertOptions, progress: bool = False) -> ConversionReport:
    """Convert, reading and writing one module at a time: peak memory is about the largest module (the
    LLM), not the whole model. `progress`: a bar per module on stderr."""
    if opts.out.exists() and any(opts.out.iterdir()):
        raise ConversionError(f"--out {opts.out}: exists and is not empty")
    conversion = plan(opts)
    dtype = DTYPES[opts.dtype]
    _save_atomically(
        opts.out,
        conversion.manifest,
        conversion.tokenizer,
        lambda name: module_tensors(name, conversion.tensors[name], dtype, progress),
    )
    return conversion.report


def module_tensors(name: str, pending: dict[str, Pending], dtype: torch.dtype, progress: bool = False) -> dict:
    """One module's tensors, read and cast now (behind a progress bar when `progress`)."""
    items = pending.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=name, unit="tensor")
    return {key: p.load().to(dtype) for key, p in items}


def prompt_format(opts: ConvertOptions) -> str:
    """The stage-2 checkpoint's training format: given, or `mmdialog` for a stage-2 file named so
    (upstream's stage2_mmdialog.ckpt), else `vist` (stage2_vist.ckpt, and stage 1 alone)."""
    if opts.prompt_format:
        return opts.prompt_format
    return "mmdialog" if opts.stage2 is not None and "mmdialog" in opts.stage2.name.lower() else "vist"


def _provenance(opts: ConvertOptions, ranks: set[int]) -> dict:
    files = {
        f: str(getattr(opts, f))
        for f in ("stage1", "stage2", "vicuna", "blip2", "eva_vit", "minigpt4_proj", "sd")
        if getattr(opts, f) is not None
    }
    return {
        "kind": "upstream-convert",
        "files": files,
        "preset": opts.preset,
        "dtype": opts.dtype,
        "lora": {"ranks": sorted(ranks), "alpha": opts.lora_alpha},
    }


def _save_atomically(out: Path, manifest: dict, tokenizer, state_dicts) -> None:
    """Write into a sibling temp dir, then rename: a failed conversion never leaves half a layout."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier run of this pid that was killed
    staging.mkdir(parents=True)
    try:
        save_weights(staging, manifest, tokenizer, state_dicts)
        if out.exists():
            out.rmdir()  # empty (checked in convert)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
