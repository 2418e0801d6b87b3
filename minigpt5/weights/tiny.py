"""Tiny random weights in the real layout: built offline in seconds, identical for the same seed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import components
from ..config import DEFAULT_BOS, DEFAULT_GENERATION, PROMPT_FORMATS, preset
from ..tokenizer import build_tiny_tokenizer
from .layout import MANIFEST, VERSION, make_manifest, save_weights


def build_tiny_weights(out_dir: str | Path, seed: int = 0) -> Path:
    tokenizer = build_tiny_tokenizer()
    manifest = make_manifest(preset("tiny"), tokenizer, source={"kind": "tiny-random", "seed": seed})
    arch = manifest["architecture"]
    state_dicts = {}
    for index, name in enumerate(components.COMPONENTS):
        torch.manual_seed(seed * 1000 + index)
        module = components.build(name, arch)
        _spread_learned_queries(module)
        state_dicts[name] = module.state_dict()
    return save_weights(out_dir, manifest, tokenizer, state_dicts)


def _spread_learned_queries(module: torch.nn.Module) -> None:
    """Query tokens start at zero in the constructors; give them upstream's N(0, 0.02) init so the
    32 / 77 queries differ from each other (otherwise every query yields the same output)."""
    for name in ("query_tokens", "t2i_decoder_prompt"):
        param = getattr(module, name, None)
        if param is not None:
            with torch.no_grad():
                param.normal_(0.0, 0.02)


def _recipe_digest() -> str:
    """Changes when what goes into the tiny manifest changes, so a cached copy is never stale."""
    recipe = [preset("tiny"), DEFAULT_GENERATION, PROMPT_FORMATS, DEFAULT_BOS]
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT5_CACHE", Path.home() / ".cache" / "minigpt5"))


def default_tiny_weights(seed: int = 0) -> Path:
    """The built-in tiny weights: built on first use into the cache, then reused."""
    target = cache_dir() / f"tiny-seed{seed}-v{VERSION}-{_recipe_digest()}"
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    build_tiny_weights(staging, seed)
    try:
        staging.rename(target)  # atomic: concurrent builders never see half a directory
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target
