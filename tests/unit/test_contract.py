"""The wire contract (client/minigpt5_client/contract.py) is what the served model declares and reads:
its config.pbtxt, the server's choices, and the parameters build_request takes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from minigpt5.image_decoder import SCHEDULERS
from minigpt5.request import build_request
from minigpt5.sampling import FORCE_IMAGE_MODES
from minigpt5_client.contract import EVENT_TYPES, INPUT, INPUTS, OUTPUTS, PARAMETERS, SCALAR_INPUTS, input_array

ROOT = Path(__file__).resolve().parents[2]


def _declared(tensors) -> dict:
    """name -> (datatype as the contract writes it, shape, optional) of config.pbtxt tensors."""

    def datatype(code: int) -> str:
        name = model_config_pb2.DataType.Name(code).removeprefix("TYPE_")
        return "BYTES" if name == "STRING" else name

    return {
        t.name: (datatype(t.data_type), tuple(t.dims), "optional" in t.DESCRIPTOR.fields_by_name and t.optional)
        for t in tensors
    }


def test_the_contract_is_what_config_pbtxt_declares():
    text = (ROOT / "model_repository" / "minigpt5" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert _declared(config.input) == {t.name: (t.datatype, t.shape, t.optional) for t in INPUTS}
    assert _declared(config.output) == {t.name: (t.datatype, t.shape, False) for t in OUTPUTS}
    # the event types the config's comment lists are the contract's
    comment = re.search(r'name: "event_type".*#\s*(.+)', text)[1]
    assert tuple(kind.strip() for kind in comment.split("|")) == EVENT_TYPES


def test_the_choices_are_the_servers():
    assert INPUT["force_image_mode"].choices == FORCE_IMAGE_MODES
    assert INPUT["scheduler"].choices == SCHEDULERS


def test_every_scalar_input_is_a_build_request_argument():
    arguments = set(inspect.signature(build_request).parameters)
    read_apart = {"text_input": "prompt", "history": "history", "image_preprocess": None}
    for name in SCALAR_INPUTS:
        assert read_apart.get(name, name) in arguments | {None}, name
    assert {tensor.name for tensor in PARAMETERS.values()} <= arguments


def test_input_arrays_have_the_declared_dtypes():
    assert input_array("max_tokens", 5).dtype.name == "int32"
    assert input_array("random_seed", 2**63).dtype.name == "uint64"
    assert input_array("force_image", True).dtype.name == "bool"
    assert input_array("image_bytes", [b"\x89PNG", "abc"]).tolist() == [b"\x89PNG", b"abc"]
    assert input_array("images", [[[[0, 1, 2]]]]).dtype.name == "uint8"


@pytest.mark.parametrize("model, options", [("minigpt5", "PublicModelOptions"), ("vicuna_decoder", "DecoderOptions")])
def test_model_options_come_from_config_pbtxt_alone(model, options):
    from minigpt5.launcher.repository import config_parameters
    from minigpt5.serving import options as module

    cls = getattr(module, options)
    params = config_parameters((ROOT / "model_repository" / model / "config.pbtxt").read_text())
    built = cls.from_parameters(params)  # every option has its default in the config
    assert all(
        str(getattr(built, name)) == params[name] or float(params[name]) == getattr(built, name)
        for name in built.__dataclass_fields__
    )
    name = next(iter(built.__dataclass_fields__))
    with pytest.raises(ValueError, match=f"{name}: missing"):
        cls.from_parameters({k: v for k, v in params.items() if k != name})
    numeric = next(n for n, f in built.__dataclass_fields__.items() if f.type in ("int", "float"))
    with pytest.raises(ValueError, match=f"{numeric}: expected"):
        cls.from_parameters({**params, numeric: "lots"})
