"""The models' config.pbtxt `parameters` as typed options, each read and converted in one place. The
defaults live in config.pbtxt only (commented there); a parameter missing from it is an error, and a
value that does not convert names its parameter."""

from __future__ import annotations

from dataclasses import dataclass, fields

_TYPES = {"int": int, "float": float, "str": str}


class _Options:
    @classmethod
    def from_parameters(cls, params: dict):
        """The options from a config.pbtxt `parameters` dict."""
        return _build(cls, params)


def _build(cls, params: dict):
    values = {}
    for option in fields(cls):
        if option.name not in params:
            raise ValueError(f"{option.name}: missing from the model's config.pbtxt parameters")
        kind = _TYPES[str(option.type)]
        try:
            values[option.name] = kind(params[option.name])
        except ValueError:
            raise ValueError(f"{option.name}: expected {option.type}, got {params[option.name]!r}") from None
    return cls(**values)


@dataclass(frozen=True)
class PublicModelOptions(_Options):
    """`minigpt5`: admission, deadlines, streaming cadence, the image-embedding cache."""

    max_inflight_requests: int
    request_timeout_s: float
    stream_interval_ms: float
    image_embedding_cache_mb: float


@dataclass(frozen=True)
class DecoderOptions(_Options):
    """`vicuna_decoder`: the engine's budgets and switches, and how long a link call waits for events."""

    llm_quantization: str
    kv_cache_budget_tokens: int
    max_batch_rows: int
    max_prefill_tokens_per_step: int
    kv_preallocate: str  # auto | true | false
    decode_cuda_graphs: str  # auto | true | false
    prefix_cache_tokens: int
    prefix_cache_block_tokens: int
    link_wait_ms: float
