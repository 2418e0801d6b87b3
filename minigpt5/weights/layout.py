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
from safetensors import safe_open
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


def make_manifest(
    arch: dict, tokenizer, *, bos: str | None = None, prompt_format: str = "vist", source: dict | None = None
) -> dict:
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
        "tokens": {
            "vokens": ids["vokens"],
            "image_placeholder": ids["image_placeholder"],
            "bos": bos,
            "bos_id": ids["bos"][bos],
            "eos_id": ids["eos"],
        },
        "prompt": {"format": prompt_format, "system": PROMPT_FORMATS[prompt_format]},
        "defaults": dict(DEFAULT_GENERATION),
        "scheduler": dict(SCHEDULER),
        "source": source or {},
    }


def save_weights(out_dir: str | Path, manifest: dict, tokenizer, state_dicts, progress: bool = False) -> Path:
    """Write a weights directory. `state_dicts`: {module: state dict}, or a callable module -> state dict
    called once per module, so that only one module's tensors need to be alive at a time (safetensors
    writes straight from the tensors' memory). `progress`: a bar on stderr, one step per module."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    produce = state_dicts if callable(state_dicts) else state_dicts.__getitem__
    for name in module_progress(progress, "write"):
        write_module(out, name, produce(name))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def write_module(out: Path, name: str, state_dict: dict) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(out / component_file(name)), metadata={"format": "pt"})


def module_progress(show: bool, verb: str):
    """The module names in layout order, behind a progress bar on stderr when `show`."""
    if not show:
        return components.COMPONENTS
    from tqdm import tqdm

    bar = tqdm(components.COMPONENTS, unit="module", desc=verb)
    return _named(bar, verb)


def _named(bar, verb: str):
    for name in bar:
        bar.set_description(f"{verb} {name}")
        yield name


class WeightsDir:
    """A validated weights directory; builds and loads modules on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no {MANIFEST} (build one with `minigpt5 weights tiny` or `minigpt5 weights convert`)"
            )
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
        """Build module `name` on `device` in `dtype` without random initialisation, then fill it from its
        file one tensor at a time: peak memory is the module plus its largest tensor, not twice the module
        (the 7B LLM at real size). Strict: every key and every shape must match."""
        from transformers.initialization import no_init_weights

        with components.building_on(device, dtype), no_init_weights():
            module = components.build(name, self.arch)
        path = self.path / component_file(name)
        targets = module.state_dict()
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            keys = set(handle.keys())
            missing, unexpected = sorted(set(targets) - keys), sorted(keys - set(targets))
            if missing or unexpected:
                raise ValueError(f"{path}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
            with torch.no_grad():
                for key in sorted(keys):
                    _fill(targets[key], handle.get_tensor(key), f"{path}: {key}")
        return module.eval()


def _fill(target: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if target.shape != value.shape:
        raise ValueError(f"{what} has shape {list(value.shape)}, the model needs {list(target.shape)}")
    target.copy_(value)
