"""A `POST /v1/chat/completions` body -> ChatRequest, or a 400 naming the field.

Every field OpenAI defines is either honoured, accepted at a value that asks for nothing we lack
(`n: 1`, `logprobs: false`, `response_format: {"type": "text"}`, ...), or refused: a request is
never silently answered differently from what it asked. Our own fields (`force_image`, `force_image_mode`,
`max_images`, `guidance_scale`, `num_inference_steps`, `scheduler`, `top_k`, `repetition_penalty`,
`image_preprocess`, `inline_images`, `handoff`) come as extra body fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contract import PARAMETERS
from ..preprocess import PREPROCESS_MODES
from .errors import GatewayError, bad_request
from .handoff_config import AUTO
from .messages import ChatTurn, parse_messages
from .settings import GatewaySettings

_INTEGER = ("max_tokens", "max_completion_tokens", "seed", "top_k", "num_inference_steps", "max_images", "n")
_NUMBER = ("temperature", "top_p", "guidance_scale", "repetition_penalty")
_BOOLEAN = ("stream", "force_image", "inline_images")
_STRING = ("scheduler", "image_preprocess", "force_image_mode")
# Passed to the model as they are (thin-client keywords); the server checks their ranges and names them.
# max_tokens is read apart, with OpenAI's max_completion_tokens.
_MODEL_PARAMETERS = tuple(keyword for keyword in PARAMETERS if keyword != "max_tokens")
# Accepted only at the value that asks for nothing: field -> (values accepted, why the rest is refused).
_NEUTRAL = {
    "n": ((None, 1), "one choice per request"),
    "logprobs": ((None, False), "no log probabilities"),
    "top_logprobs": ((None, 0), "no log probabilities"),
    "tools": ((None, []), "no tools"),
    "functions": ((None, []), "no functions"),
    "tool_choice": ((None, "none"), "no tools"),
    "function_call": ((None, "none"), "no functions"),
    "stop": ((None, [], ""), "no stop sequences; ask for fewer max_tokens"),
    "presence_penalty": ((None, 0, 0.0), "no presence penalty; use repetition_penalty"),
    "frequency_penalty": ((None, 0, 0.0), "no frequency penalty; use repetition_penalty"),
    "logit_bias": ((None, {}), "no logit bias"),
    "audio": ((None,), "no audio"),
    "prediction": ((None,), "no predicted outputs"),
    "reasoning_effort": ((None,), "no reasoning effort setting"),
    "web_search_options": ((None,), "no web search"),
    "store": ((None, False), "nothing is stored"),
    "service_tier": ((None, "auto", "default"), "one service tier"),
    "verbosity": ((None,), "no verbosity setting"),
}
_RESPONSE_FORMATS = (None, {"type": "text"})
# Identifiers and hints that change nothing in the answer.
_IGNORED = ("user", "metadata", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
_KNOWN = {
    "model",
    "messages",
    "stream_options",
    "response_format",
    "modalities",
    "handoff",
    *_INTEGER,
    *_NUMBER,
    *_BOOLEAN,
    *_STRING,
    *_NEUTRAL,
    *_IGNORED,
}


@dataclass
class ChatRequest:
    model: str  # as asked for; the answer names it back
    turns: list[ChatTurn]  # oldest first; the last is the user's new message
    params: dict = field(default_factory=dict)  # thin-client keywords: max_tokens, temperature, seed, ...
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    inline_images: bool = False
    max_images: int | None = None
    preprocess: str = "pad"
    handoff: str | None = None  # a hand-off target's name, "auto", or None
    messages: list = field(default_factory=list)  # as received, for the hand-off

    @property
    def history(self) -> list[ChatTurn]:
        return self.turns[:-1]

    @property
    def message(self) -> ChatTurn:
        return self.turns[-1]


def parse_chat_request(body, settings: GatewaySettings) -> ChatRequest:
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    _refuse_unknown_and_unsupported(body)
    _check_types(body)
    request = ChatRequest(
        model=_model(body), turns=parse_messages(body.get("messages"), settings.image_hosts), messages=body["messages"]
    )
    request.stream = bool(body.get("stream"))
    request.include_usage = _include_usage(body, request.stream)
    request.inline_images = body.get("inline_images", settings.inline_images)
    request.preprocess = _preprocess(body, settings.preprocess)
    request.params = _model_parameters(body)
    request.max_images = _max_images(body, request.params)
    request.handoff = _handoff(body, request.model, settings)
    return request


def split_model_name(model: str, base_name: str) -> str | None:
    """`minigpt5+gpt-4.1-mini` -> "gpt-4.1-mini"; `minigpt5` -> None; anything else -> 404."""
    if model == base_name:
        return None
    prefix = base_name + "+"
    if model.startswith(prefix) and len(model) > len(prefix):
        return model[len(prefix) :]
    raise GatewayError(
        404,
        f"The model `{model}` does not exist; GET /v1/models lists the models served here",
        param="model",
        code="model_not_found",
    )


def _refuse_unknown_and_unsupported(body: dict) -> None:
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad_request(unknown[0], "unrecognized request argument (docs/GATEWAY.md lists the fields)")
    for name, (accepted, reason) in _NEUTRAL.items():
        # the type too: `n: true` equals 1 but is not what is accepted
        if name in body and not any(body[name] == value and type(body[name]) is type(value) for value in accepted):
            raise bad_request(name, f"not supported: {reason} (got {_short(body[name])})")
    if body.get("response_format") not in _RESPONSE_FORMATS:
        raise bad_request("response_format", 'only {"type": "text"} is supported')


def _check_types(body: dict) -> None:
    for name in _INTEGER:
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad_request(name, f"must be an integer, got {value!r}")
    for name in _NUMBER:
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise bad_request(name, f"must be a number, got {value!r}")
    for name in _BOOLEAN:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad_request(name, f"must be true or false, got {body[name]!r}")
    for name in _STRING:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad_request(name, f"must be a string, got {body[name]!r}")


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model", "required: the name of a model from GET /v1/models")
    return model


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options", "only allowed when stream is true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad_request("stream_options", 'must be {"include_usage": true|false}')
    return bool(options.get("include_usage"))


def _preprocess(body: dict, default: str) -> str:
    mode = body.get("image_preprocess") or default
    if mode not in PREPROCESS_MODES:
        raise bad_request("image_preprocess", f"must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
    return mode


def _model_parameters(body: dict) -> dict:
    params = {name: body[name] for name in _MODEL_PARAMETERS if body.get(name) is not None}
    max_tokens, max_completion_tokens = body.get("max_tokens"), body.get("max_completion_tokens")
    if None not in (max_tokens, max_completion_tokens) and max_tokens != max_completion_tokens:
        raise bad_request(
            "max_completion_tokens",
            f"differs from max_tokens ({max_completion_tokens} vs {max_tokens}); give one of them",
        )
    if (max_completion_tokens or max_tokens) is not None:
        params["max_tokens"] = max_completion_tokens if max_completion_tokens is not None else max_tokens
    if params.get("seed") is not None and not 0 <= params["seed"] < 2**64:
        raise bad_request("seed", f"must be between 0 and {2**64 - 1}, got {params['seed']}")
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not set(modalities) <= {"text", "image"} or "text" not in modalities:
            raise bad_request(
                "modalities",
                f'must be ["text"] or ["text", "image"] (MiniGPT-5 always writes text), got {modalities!r}',
            )
        wants_image = "image" in modalities
        if body.get("force_image") is not None and body["force_image"] != wants_image:
            raise bad_request("force_image", f"{str(body['force_image']).lower()} contradicts modalities {modalities}")
        if wants_image:
            params["force_image"] = True
    return params


def _max_images(body: dict, params: dict) -> int | None:
    max_images = body.get("max_images")
    if max_images is None:
        return None
    if max_images < 0:
        raise bad_request("max_images", f"must be 0 or more, got {max_images}")
    if max_images == 0 and params.get("force_image"):
        raise bad_request("max_images", '0 contradicts force_image (or modalities with "image")')
    return max_images


def _handoff(body: dict, model: str, settings: GatewaySettings) -> str | None:
    from_model = split_model_name(model, settings.model_name)
    from_field = body.get("handoff")
    if from_field is not None and not isinstance(from_field, str):
        raise bad_request("handoff", f'must be the name of a hand-off model or "auto", got {from_field!r}')
    if from_model and from_field and from_model != from_field:
        raise bad_request("handoff", f"{from_field!r} differs from the model name's {from_model!r}")
    name = from_field or from_model
    targets = settings.handoff.targets
    if name is None or name in targets or (name == AUTO and settings.handoff.routes):
        return name
    known = ", ".join([*targets, *([AUTO] if settings.handoff.routes else [])]) or "none configured"
    if from_model and not from_field:
        raise GatewayError(
            404, f"The model `{model}` does not exist; hand-off models: {known}", param="model", code="model_not_found"
        )
    raise bad_request("handoff", f"{name!r} is not a hand-off model here; known: {known}")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
