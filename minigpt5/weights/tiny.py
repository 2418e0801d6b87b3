"""Tiny random weights in the real layout: built offline in seconds, identical for the same seed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..config import DEFAULT_BOS, DEFAULT_GENERATION, PROMPT_FORMATS, preset
from ..tokenizer import build_tiny_tokenizer
from .layout import MANIFEST, VERSION, make_manifest, save_weights
from .random_weights import random_module


def build_tiny_weights(out_dir: str | Path, seed: int = 0) -> Path:
    tokenizer = build_tiny_tokenizer()
    manifest = make_manifest(preset("tiny"), tokenizer, source={"kind": "tiny-random", "seed": seed})
    arch = manifest["architecture"]
    return save_weights(out_dir, manifest, tokenizer, lambda name: random_module(name, arch, seed).state_dict())


def _recipe_digest() -> str:
    """Changes when what goes into the tiny manifest changes, so a cached copy is never stale."""
    recipe = [preset("tiny"), DEFAULT_GENERATION, PROMPT_FORMATS, DEFAULT_BOS]
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT5_CACHE", Path.home() / ".cache" / "minigpt5"))


def resolve_weights(path: str | Path | None) -> Path:
    """The weights directory a command was given, else the built-in tiny weights (built on first use)."""
    return Path(path if path is not None else default_tiny_weights()).resolve()


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
