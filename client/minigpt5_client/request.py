"""One generate request for the served model `minigpt5` (docs/API.md, "Inputs"), independent of transport."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np

from .contract import IMAGE_SIZE, PARAMETERS, input_array
from .errors import InvalidArgument
from .preprocess import encode_png

# Generation parameters: contract.PARAMETERS (keyword -> input). Values left as None are not sent: the
# server's defaults apply.
_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "INT32": int,
    "UINT64": int,
    "FP32": (int, float),
    "BOOL": bool,
    "BYTES": str,
}
_INTEGER_RANGES: dict[str, tuple[int, int]] = {"INT32": (-(2**31), 2**31), "UINT64": (0, 2**64)}  # [low, high)


@dataclass
class GenerateRequest:
    """What is sent: this turn's text, all images (earlier turns' first), earlier turns, sampling parameters."""

    prompt: str
    images: np.ndarray  # uint8 [N, 224, 224, 3]
    history: list[dict] = field(default_factory=list)
    parameters: dict[str, tuple[object, str]] = field(default_factory=dict)  # input name -> (value, datatype)

    def tensors(self) -> dict[str, np.ndarray]:
        """The request as named input tensors (gRPC): images travel as the raw `images` UINT8 tensor."""
        tensors = {"text_input": input_array("text_input", self.prompt), "stream": input_array("stream", True)}
        if len(self.images):
            tensors["images"] = self.images
        if self.history:
            tensors["history"] = input_array("history", json.dumps(self.history))
        for name, (value, _) in self.parameters.items():
            tensors[name] = input_array(name, value)
        return tensors

    def json_body(self) -> dict:
        """The request as a `/generate_stream` JSON body.

        JSON has no compact uint8 tensor, so images go as base64 PNGs in `image_bytes`. They are the
        pre-processed 224x224 squares, for which the server's pad/crop and resize change nothing:
        it sees the same pixels as over gRPC.
        """
        body: dict = {"text_input": self.prompt, "stream": True}
        if len(self.images):
            body["image_bytes"] = [base64.b64encode(encode_png(pixels)).decode("ascii") for pixels in self.images]
        if self.history:
            body["history"] = json.dumps(self.history)
        body.update((name, value) for name, (value, _) in self.parameters.items())
        return body


def build_request(prompt: str, images: np.ndarray, history: list[dict], params: dict) -> GenerateRequest:
    """Check the Python-side arguments (names and types; the server checks ranges) and build the request."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise InvalidArgument(
            f"pre-processed images must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], "
            f"got {images.dtype} {list(images.shape)}"
        )
    parameters = {}
    for keyword, value in params.items():
        if keyword not in PARAMETERS:
            raise TypeError(f"unknown generation parameter {keyword!r}; known: {', '.join(PARAMETERS)}")
        if value is None:
            continue
        name, datatype = PARAMETERS[keyword].name, PARAMETERS[keyword].datatype
        expected = _PYTHON_TYPES[datatype]
        if not isinstance(value, expected) or (isinstance(value, bool) and datatype != "BOOL"):
            raise TypeError(f"{keyword} must be {datatype.lower()}, got {type(value).__name__}")
        if isinstance(value, int) and datatype in _INTEGER_RANGES:
            low, high = _INTEGER_RANGES[datatype]
            if not low <= value < high:
                raise InvalidArgument(f"{keyword} must be between {low} and {high - 1}, got {value}")
        if isinstance(value, int) and datatype == "FP32":
            value = float(value)
        parameters[name] = (value, datatype)
    return GenerateRequest(prompt, images, list(history), parameters)
