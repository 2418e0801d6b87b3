"""The model repository tritonserver serves: a copy of `model_repository/` in a work directory, holding
only the model directories, with config.pbtxt `parameters` overridden (`minigpt5 serve --param
minigpt5.max_inflight_requests=4`, or `parameters={"minigpt5": {"max_inflight_requests": "4"}}`).
The configs are read and written with Triton's own protobuf schema; the repository itself is never
edited."""

from __future__ import annotations

import shutil
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _model_config(config_text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(config_text, model_config_pb2.ModelConfig())


def config_parameters(config_text: str) -> dict[str, str]:
    """The `parameters` string values of a config.pbtxt."""
    return {key: value.string_value for key, value in _model_config(config_text).parameters.items()}


def rewrite_parameters(config_text: str, values: dict[str, str], model: str = "model") -> str:
    """config.pbtxt text with the string values of existing `parameters` keys replaced (comments are
    not kept). Unknown keys are refused: nothing is added."""
    from google.protobuf import text_format

    config = _model_config(config_text)
    unknown = sorted(set(values) - set(config.parameters))
    if unknown:
        raise ValueError(
            f"{model}: no parameter {', '.join(unknown)} in its config.pbtxt "
            f"(known: {', '.join(sorted(config.parameters))})"
        )
    for key, value in values.items():
        config.parameters[key].string_value = str(value)
    return text_format.MessageToString(config)


def prepare_repository(workdir: Path, parameters: dict[str, dict[str, str]] | None, source: Path | None = None) -> Path:
    """The repository to serve: a copy in `workdir` of the models in `source` (default REPOSITORY)
    with `parameters` applied. Only directories holding a config.pbtxt are copied: a model directory
    left behind by an older checkout (its __pycache__ survives `git pull`) would make Triton refuse
    to start, and the stubs' __pycache__ stays out of the source tree."""
    source = Path(source or REPOSITORY)
    parameters = parameters or {}
    models = sorted(p.parent.name for p in source.glob("*/config.pbtxt"))
    unknown = sorted(set(parameters) - set(models))
    if unknown:
        raise ValueError(f"no model {', '.join(unknown)} in {source} (models: {', '.join(models)})")
    # Check every override before copying anything.
    rewritten = {
        model: rewrite_parameters(
            (source / model / "config.pbtxt").read_text(), {k: str(v) for k, v in values.items()}, model
        )
        for model, values in parameters.items()
    }
    target = workdir / "model_repository"
    if target.exists():
        shutil.rmtree(target)
    for model in models:
        shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for model, text in rewritten.items():
        (target / model / "config.pbtxt").write_text(text)
    return target


def parse_parameter_flags(flags: list[str]) -> dict[str, dict[str, str]]:
    """`MODEL.KEY=VALUE` strings (serve's --param) as {model: {key: value}}."""
    parameters: dict[str, dict[str, str]] = {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        model, dot, key = name.strip().partition(".")
        if not sep or not dot or not model or not key:
            raise ValueError(f"--param {flag!r}: expected MODEL.KEY=VALUE, e.g. minigpt5.max_inflight_requests=8")
        parameters.setdefault(model, {})[key] = value
    return parameters
