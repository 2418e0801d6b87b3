"""The hand-off configuration file (JSON): second models, prices, routing rules. Standard library only.

    {
      "handoff_models": {
        "gpt-4.1-mini": {"base_url": "https://api.openai.com/v1", "model": "gpt-4.1-mini",
                         "api_key_env": "OPENAI_API_KEY", "extra_body": {"max_completion_tokens": 1024},
                         "usd_per_million_tokens": {"input": 0.40, "output": 1.60}}
      },
      "minigpt5_usd_per_million_tokens": {"input": 0.15, "output": 0.15},
      "routes": [{"if": {"follow_up": true, "conversation_has_images": false}, "handoff": "gpt-4.1-mini"}],
      "instruction": "...", "separator": "\\n\\n**{model}:** "
    }

A request opts in by the model name `minigpt5+NAME` (or `minigpt5+auto`: the first route whose
conditions all hold picks the target, `"handoff": null` meaning none) or by the body field `handoff`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

AUTO = "auto"
ROUTE_CONDITIONS = ("follow_up", "message_has_images", "conversation_has_images")
DEFAULT_INSTRUCTION = (
    "The assistant message above is MiniGPT-5's answer to my last message; each [image N] in it marks "
    "where it placed an image it generated, and those images follow here in order. Building on its text "
    "and images, answer my last message."
)
DEFAULT_SEPARATOR = "\n\n**{model}:** "
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """The configuration file is unreadable or wrong; the message names the file and the field."""


@dataclass(frozen=True)
class Price:
    input: float = 0.0  # USD per million prompt tokens
    output: float = 0.0  # USD per million completion tokens

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * self.input + completion_tokens * self.output) / 1e6, 8)


@dataclass(frozen=True)
class HandoffTarget:
    name: str  # what requests call it (`minigpt5+NAME`)
    base_url: str  # an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    model: str  # the model name that endpoint knows
    api_key_env: str | None = None  # environment variable holding its key
    price: Price | None = None
    extra_body: dict = field(default_factory=dict)  # fields added to every request to it, e.g. max_tokens

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class Route:
    conditions: dict[str, bool]  # names from ROUTE_CONDITIONS -> the value each must have
    handoff: str | None  # target name, or None: no hand-off

    def matches(self, facts: dict[str, bool]) -> bool:
        return all(facts[name] == wanted for name, wanted in self.conditions.items())


@dataclass(frozen=True)
class HandoffConfig:
    targets: dict[str, HandoffTarget] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    minigpt5_price: Price | None = None
    instruction: str = DEFAULT_INSTRUCTION
    separator: str = DEFAULT_SEPARATOR  # put between the two answers; {model} is the target's name

    def route(self, facts: dict[str, bool]) -> str | None:
        """The target the first matching route names (None: no route matches, or it names none)."""
        return next((route.handoff for route in self.routes if route.matches(facts)), None)


def load_handoff_config(path: Path) -> HandoffConfig:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the hand-off configuration: {error}") from None
    try:
        return parse_handoff_config(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def parse_handoff_config(data: dict) -> HandoffConfig:
    _expect(isinstance(data, dict), "the configuration must be a JSON object")
    _no_unknown(data, {"handoff_models", "routes", "minigpt5_usd_per_million_tokens", "instruction", "separator"}, "")
    targets = {name: _target(name, spec) for name, spec in _mapping(data, "handoff_models").items()}
    routes = tuple(_route(index, spec, targets) for index, spec in enumerate(data.get("routes", [])))
    price = data.get("minigpt5_usd_per_million_tokens")
    return HandoffConfig(
        targets,
        routes,
        _price(price, "minigpt5_usd_per_million_tokens") if price else None,
        _text(data, "instruction", DEFAULT_INSTRUCTION),
        _text(data, "separator", DEFAULT_SEPARATOR),
    )


def _target(name: str, spec) -> HandoffTarget:
    where = f"handoff_models.{name}"
    _expect(
        bool(_NAME.match(name)) and name != AUTO, f"{where}: a name is letters, digits, '.', '_', '-' and not 'auto'"
    )
    _expect(isinstance(spec, dict), f"{where}: must be an object")
    _no_unknown(spec, {"base_url", "model", "api_key_env", "usd_per_million_tokens", "extra_body"}, where)
    _expect(isinstance(spec.get("extra_body", {}), dict), f"{where}.extra_body: must be an object")
    for key in ("base_url", "model"):
        _expect(isinstance(spec.get(key), str) and spec[key], f"{where}.{key}: required, a string")
    _expect(spec["base_url"].startswith(("http://", "https://")), f"{where}.base_url: must be an http(s) URL")
    price = spec.get("usd_per_million_tokens")
    return HandoffTarget(
        name,
        spec["base_url"],
        spec["model"],
        spec.get("api_key_env"),
        _price(price, f"{where}.usd_per_million_tokens") if price else None,
        dict(spec.get("extra_body", {})),
    )


def _route(index: int, spec, targets: dict) -> Route:
    where = f"routes[{index}]"
    _expect(isinstance(spec, dict) and "handoff" in spec, f"{where}: must be an object with `if` and `handoff`")
    _no_unknown(spec, {"if", "handoff"}, where)
    conditions = spec.get("if", {})
    _expect(isinstance(conditions, dict), f"{where}.if: must be an object")
    for name, value in conditions.items():
        _expect(name in ROUTE_CONDITIONS, f"{where}.if.{name}: unknown condition; known: {', '.join(ROUTE_CONDITIONS)}")
        _expect(isinstance(value, bool), f"{where}.if.{name}: must be true or false")
    handoff = spec["handoff"]
    _expect(handoff is None or handoff in targets, f"{where}.handoff: {handoff!r} is not in handoff_models")
    return Route(dict(conditions), handoff)


def _price(spec, where: str) -> Price:
    _expect(isinstance(spec, dict), f"{where}: must be an object with `input` and `output`")
    _no_unknown(spec, {"input", "output"}, where)
    for key in ("input", "output"):
        value = spec.get(key, 0.0)
        _expect(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
            f"{where}.{key}: must be a number >= 0 (USD per million tokens)",
        )
    return Price(float(spec.get("input", 0.0)), float(spec.get("output", 0.0)))


def _mapping(data: dict, key: str) -> dict:
    value = data.get(key, {})
    _expect(isinstance(value, dict), f"{key}: must be an object")
    return value


def _text(data: dict, key: str, default: str) -> str:
    value = data.get(key, default)
    _expect(isinstance(value, str), f"{key}: must be a string")
    return value


def _no_unknown(spec: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(spec) - known)
    _expect(
        not unknown,
        f"{where + ': ' if where else ''}unknown field {', '.join(unknown)}; known: {', '.join(sorted(known))}",
    )


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
