"""The wire contract of the served model `minigpt5`, in one place (no torch): every input and output with
its Triton datatype and shape, which inputs are optional, the client's keyword for each generation
parameter, the choices of the string inputs, and the event types of a streamed answer.

The server (minigpt5/request.py), this client, the tests and the benches read it, and a test checks it
against model_repository/minigpt5/config.pbtxt. Numeric limits and the defaults are the server's
(docs/LIMITS.md; docs/API.md lists each default and where it comes from); the history limits below are
repeated for clients that trim a conversation, and a test holds them equal to the server's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODEL_NAME = "minigpt5"
IMAGE_SIZE = 224  # pre-processed images are IMAGE_SIZE x IMAGE_SIZE RGB
# The server's limits on a request's history (docs/LIMITS.md), for clients that trim a conversation.
MAX_IMAGES = 8  # input images per request, all turns together
MAX_HISTORY_TURNS = 32
MAX_HISTORY_CHARS = 64_000


@dataclass(frozen=True)
class Tensor:
    """One input or output: Triton's datatype (BYTES for its TYPE_STRING) and shape (-1: any length)."""

    name: str
    datatype: str
    shape: tuple[int, ...] = (1,)
    optional: bool = True
    keyword: str | None = None  # the client's keyword argument, for the generation parameters
    choices: tuple[str, ...] = ()  # the values a string input takes

    @property
    def numpy_dtype(self):
        return NUMPY_DTYPES[self.datatype]


NUMPY_DTYPES = {
    "BYTES": np.object_,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "BOOL": np.bool_,
}

INPUTS = (
    Tensor("text_input", "BYTES", optional=False),
    Tensor("images", "UINT8", (-1, IMAGE_SIZE, IMAGE_SIZE, 3)),  # pre-processed by the client
    Tensor("image_bytes", "BYTES", (-1,)),  # encoded files, or base64 of them (JSON clients)
    Tensor("image_preprocess", "BYTES", choices=("pad", "crop")),  # for image_bytes
    Tensor("history", "BYTES"),  # JSON list of the earlier turns
    Tensor("max_tokens", "INT32", keyword="max_tokens"),
    Tensor("stream", "BOOL"),
    Tensor("temperature", "FP32", keyword="temperature"),
    Tensor("top_p", "FP32", keyword="top_p"),
    Tensor("top_k", "INT32", keyword="top_k"),
    Tensor("repetition_penalty", "FP32", keyword="repetition_penalty"),
    Tensor("random_seed", "UINT64", keyword="seed"),
    Tensor("force_image", "BOOL", keyword="force_image"),
    Tensor("force_image_mode", "BYTES", keyword="force_image_mode", choices=("first", "end")),
    Tensor("max_images", "INT32", keyword="max_images"),
    Tensor("guidance_scale", "FP32", keyword="guidance_scale"),
    Tensor("num_inference_steps", "INT32", keyword="num_inference_steps"),
    Tensor("scheduler", "BYTES", keyword="scheduler", choices=("pndm", "dpm")),
)
OUTPUTS = (
    Tensor("event_type", "BYTES"),
    Tensor("sequence_index", "INT32"),
    Tensor("text_output", "BYTES"),
    Tensor("image_output", "BYTES", (-1,)),  # base64 PNGs
    Tensor("image_offset", "INT32", (-1,)),  # where each image sits in the text
    Tensor("finish_reason", "BYTES"),
    Tensor("usage", "BYTES"),  # JSON
)
EVENT_TYPES = ("text", "image_start", "image", "final", "complete")

INPUT = {tensor.name: tensor for tensor in INPUTS}
# The generation parameters by the client's keyword (`seed` is the input `random_seed`).
PARAMETERS = {tensor.keyword: tensor for tensor in INPUTS if tensor.keyword}
# The one-element inputs the server reads as scalars (all but the two image inputs).
SCALAR_INPUTS = tuple(tensor.name for tensor in INPUTS if tensor.shape == (1,))


def input_array(name: str, value) -> np.ndarray:
    """`value` as the tensor of input `name`: a list (or one value) for BYTES, the right dtype otherwise."""
    tensor = INPUT[name]
    if tensor.datatype == "BYTES":
        values = value if isinstance(value, (list, tuple)) else [value]
        return np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values], dtype=np.object_)
    if tensor.shape != (1,):
        return np.asarray(value, dtype=tensor.numpy_dtype)
    return np.array([value], dtype=tensor.numpy_dtype)
