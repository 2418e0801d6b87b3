"""All glue with Triton's python backend (`triton_python_backend_utils`) in one place.

The serving modules call these helpers instead of pb_utils directly, so the unit tests can replace
`triton_python_backend_utils` with a small fake module and run without Triton.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import InvalidRequest, Overloaded


def input_array(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request, name: str) -> np.ndarray:
    """An input the model's config declares required (Triton refuses requests without it)."""
    return _present(input_array(request, name), InvalidRequest(f"{name}: required input is missing"))


def input_scalar(request, name: str):
    """A scalar input (any shape with one element) as a Python value, or None when absent."""
    array = input_array(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"{name}: expected one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        return decode_text(name, value)
    return value.item() if hasattr(value, "item") else value


def input_strings(request, name: str) -> list[bytes]:
    array = input_array(request, name)
    return [] if array is None else [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]


def decode_text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{name}: not valid UTF-8 (byte {exc.start})") from None


def string_tensor(name: str, values) -> pb_utils.Tensor:
    items = [values] if isinstance(values, (str, bytes)) else list(values)
    encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in items]
    return pb_utils.Tensor(name, np.array(encoded, dtype=np.object_))


def tensor(name: str, array) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


def response(tensors: list) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(exc: BaseException) -> pb_utils.InferenceResponse:
    """The error a client sees: INVALID_ARG for bad input, UNAVAILABLE for overload, INTERNAL otherwise."""
    if isinstance(exc, InvalidRequest):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(exc, Overloaded):
        code = pb_utils.TritonError.UNAVAILABLE
    else:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code))


def send(sender, reply=None, final: bool = False) -> None:
    """Send one response on a decoupled sender; `final` closes the stream."""
    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
    sender.send(reply, flags=flags)


def raise_if_error(reply) -> None:
    """Turn a BLS child response's error into an exception of the matching kind."""
    if reply.has_error():
        error = reply.error()
        message = error.message()
        code = error.code() if hasattr(error, "code") else None
        if code == pb_utils.TritonError.INVALID_ARG:
            raise InvalidRequest(message)
        if code == pb_utils.TritonError.UNAVAILABLE:
            raise Overloaded(message)
        raise RuntimeError(message)


def output_array(reply, name: str) -> np.ndarray | None:
    tensor_ = pb_utils.get_output_tensor_by_name(reply, name)
    return None if tensor_ is None else tensor_.as_numpy()


def required_output(reply, name: str) -> np.ndarray:
    """An output a BLS child always sends; its absence is a server fault, not the client's."""
    return _present(output_array(reply, name), RuntimeError(f"{name}: output missing from the child's response"))


def _present(array: np.ndarray | None, missing: Exception) -> np.ndarray:
    if array is None:
        raise missing
    return array


def log_info(message: str) -> None:
    pb_utils.Logger.log_info(message)


def log_warn(message: str) -> None:
    pb_utils.Logger.log_warn(message)


def log_error(message: str) -> None:
    pb_utils.Logger.log_error(message)
