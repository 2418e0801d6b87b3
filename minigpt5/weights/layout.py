"""One directory per set of weights: `manifest.json`, `tokenizer/`, one safetensors file per module.

    manifest.json        format/version, architecture dicts, token ids, BOS choice, prompt format, defaults
    tokenizer/           a transformers tokenizer with [IMG0]..[IMG7] and <ImageHere> added
    vision.safetensors   VisionTower (vision_model.*, qformer.*, query_tokens, llama_proj.*)
    llm.safetensors      LlamaForCausalLM (model.*, lm_head.*)
    mapper.safetensors   FeatureMapper (fc.*, llm_to_t2i_mapping.*, t2i_decoder_prompt)
    unet.safetensors     diffusers UNet2DConditionModel
    vae.safetensors      diffusers AutoencoderKL

Only safetensors are ever read here: loading weights cannot execute code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import components
from ..config import DEFAULT_BOS, DEFAULT_GENERATION, PROMPT_FORMATS, SCHEDULER
from ..tokenizer import load_tokenizer, special_token_ids

FORMAT = "minigpt5-triton-weights"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def component_file(name: str) -> str:
    return f"{name}.safetensors"


def make_manifest(arch: dict, tokenizer, *, bos: str | None = None, prompt_format: str = "vist",
                  source: dict | None = None) -> dict:
    """A manifest for `arch` whose token ids are read from `tokenizer`. `prompt_format`: the training
    format of the stage-2 checkpoint (`vist` or `mmdialog`, prompt.py); `bos`: None = the one that
    format's checkpoint was trained with (config.DEFAULT_BOS)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {sorted(PROMPT_FORMATS)}, got {prompt_format!r}")
    bos = DEFAULT_BOS[prompt_format] if bos is None else bos
    ids = special_token_ids(tokenizer)
    arch = json.loads(json.dumps(arch))
    arch["llm"]["vocab_size"] = len(tokenizer)
    if bos not in ids["bos"]:
        raise ValueError(f"bos must be one of {sorted(ids['bos'])}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": arch,
        "tokens": {"vokens": ids["vokens"], "image_placeholder": ids["image_placeholder"],
                   "bos": bos, "bos_id": ids["bos"][bos], "eos_id": ids["eos"]},
        "prompt": {"format": prompt_format, "system": PROMPT_FORMATS[prompt_format]},
        "defaults": dict(DEFAULT_GENERATION),
        "scheduler": dict(SCHEDULER),
        "source": source or {},
    }


def save_weights(out_dir: str | Path, manifest: dict, tokenizer, state_dicts: dict[str, dict]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    for name in components.COMPONENTS:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dicts[name].items()}
        save_file(tensors, str(out / component_file(name)), metadata={"format": "pt"})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


class WeightsDir:
    """A validated weights directory; builds and loads modules on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST} (build one with `minigpt5 weights tiny` "
                                    f"or `minigpt5 weights convert`)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest")
        missing = [component_file(n) for n in components.COMPONENTS if not (self.path / component_file(n)).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path}: missing {', '.join(missing)}")

    @property
    def arch(self) -> dict:
        return self.manifest["architecture"]

    @property
    def tokens(self) -> dict:
        return self.manifest["tokens"]

    @property
    def defaults(self) -> dict:
        """The manifest's generation defaults over the built-in ones (older manifests lack newer keys)."""
        return {**DEFAULT_GENERATION, **self.manifest["defaults"]}

    @property
    def prompt_format(self) -> tuple[str, str]:
        """(format, system prompt). Manifests written before formats existed held the VIST system prompt
        under `template: vicuna_v0`: they render as `vist`."""
        prompt = self.manifest["prompt"]
        return prompt.get("format", "vist"), prompt["system"]

    def tokenizer(self):
        return load_tokenizer(self.path / TOKENIZER_DIR)

    def state_dict(self, name: str, device="cpu") -> dict:
        return load_file(str(self.path / component_file(name)), device=str(device))

    def load(self, name: str, device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Build module `name` on `device` in `dtype` and load its tensors (strict: every key must match)."""
        with components.building_on(device, dtype):
            module = components.build(name, self.arch)
        state = self.state_dict(name, device)
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{self.path / component_file(name)}: missing keys {result.missing_keys[:10]}, "
                             f"unexpected keys {result.unexpected_keys[:10]}")
        return module.eval()
