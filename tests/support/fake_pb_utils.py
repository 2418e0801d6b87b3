"""A small, faithful fake of the parts of Triton's `triton_python_backend_utils` that minigpt5 uses.

Install it as `sys.modules["triton_python_backend_utils"]` *before* importing `minigpt5.serving.*`
(see the `pb` fixture in test_serving_units.py). What it mimics, after python_backend r24.10
(Triton 2.51) and its README:

- `Tensor(name, ndarray)`: `name()`, `as_numpy()`; numpy dtypes Triton has (STRING = object/bytes_).
- `InferenceResponse(output_tensors=..., error=...)`, `TritonError(message, code)` with Triton's codes.
- `InferenceRequest`: the request a model's `execute` gets (`inputs()`, `request_id()`,
  `get_response_sender()`, `is_cancelled()`), and the BLS request a model builds
  (`InferenceRequest(model_name=, inputs=, requested_output_names=, request_id=)` + `exec()`).
  `exec` dispatches in-process to models the test registered with `register_model` and behaves like
  the server does between two stubs: tensors are copied (strings serialised to bytes, as on the
  wire), inputs are checked against the child's config.pbtxt when one is given (name, datatype,
  shape, max_batch_size, required inputs), only the requested outputs come back, one `execute` at a
  time per model (one instance). `exec(decoupled=True)` is refused: the serving code must not make
  decoupled BLS calls (Triton 2.51 hangs or crashes under several at once; serving/decoder_link.py).
- `ResponseSender`: records `(response, flags)`; refuses sends after FINAL and a `None` response
  without FINAL (as the stub does); `is_cancelled()` is controllable by the test.
- `MetricFamily` (COUNTER / GAUGE / HISTOGRAM) and `Metric(labels, buckets)` with Triton's rules
  (counters only go up, `set` only on gauges, `observe` only on histograms, buckets only and always
  for histograms); families with the same name share their metrics, as in Triton; values are read
  back with `metric_value()` / `histogram_observations()`.
- `Logger.log_info / log_warn / log_error / log_verbose`, recorded in `logs`.

Server-side helpers for tests (not in the real module): `load_config`, `triton_args`,
`make_request`, `register_model`, `clear_models`, `bls_calls`, `reset_metrics`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


class TritonModelException(Exception):
    """What the stub raises for misuse of its API (the real one is a pybind11 exception)."""


# ---- errors ---------------------------------------------------------------------------------------
class TritonError:
    # TRITONSERVER_Error_Code values (tritonserver.h)
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    _NAMES = {
        0: "UNKNOWN",
        1: "INTERNAL",
        2: "NOT_FOUND",
        3: "INVALID_ARG",
        4: "UNAVAILABLE",
        5: "UNSUPPORTED",
        6: "ALREADY_EXISTS",
        7: "CANCELLED",
    }

    def __init__(self, message: str, code: int = INTERNAL):
        if code not in self._NAMES:
            raise TritonModelException(f"TritonError: unknown error code {code!r}")
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._NAMES[self._code]}: {self._message!r})"


# ---- tensors --------------------------------------------------------------------------------------
_NUMPY_TO_TRITON = {
    np.dtype(bool): "TYPE_BOOL",
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.uint16): "TYPE_UINT16",
    np.dtype(np.uint32): "TYPE_UINT32",
    np.dtype(np.uint64): "TYPE_UINT64",
    np.dtype(np.int8): "TYPE_INT8",
    np.dtype(np.int16): "TYPE_INT16",
    np.dtype(np.int32): "TYPE_INT32",
    np.dtype(np.int64): "TYPE_INT64",
    np.dtype(np.float16): "TYPE_FP16",
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.float64): "TYPE_FP64",
    np.dtype(np.object_): "TYPE_STRING",
}


def triton_type(array: np.ndarray) -> str:
    if array.dtype.kind == "S":
        return "TYPE_STRING"
    try:
        return _NUMPY_TO_TRITON[array.dtype]
    except KeyError:
        raise TritonModelException(f"unsupported numpy dtype {array.dtype} for a Triton tensor") from None


class Tensor:
    def __init__(self, name: str, array):
        if not isinstance(name, str):
            raise TritonModelException("Tensor: name must be a str")
        if not isinstance(array, np.ndarray):
            raise TritonModelException(f"Tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        triton_type(array)  # unsupported dtypes (e.g. unicode 'U') are refused, as by the real stub
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:
        return True

    def shape(self) -> list:
        return list(self._array.shape)

    def triton_dtype(self) -> str:
        return triton_type(self._array)

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {self._array.dtype} {list(self._array.shape)})"


def _wire_array(array: np.ndarray) -> np.ndarray:
    """The array as the other side of Triton sees it: a copy; STRING elements become bytes
    (serialize_byte_tensor: bytes stay, anything else is str()-ed and UTF-8 encoded)."""
    if array.dtype == np.object_ or array.dtype.kind == "S":
        flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.reshape(-1).tolist()]
        out = np.empty(len(flat), dtype=np.object_)
        out[:] = flat
        return out.reshape(array.shape)
    return np.array(array, copy=True, order="C")


def _wire_tensor(tensor: Tensor) -> Tensor:
    return Tensor(tensor.name(), _wire_array(tensor.as_numpy()))


# ---- responses ------------------------------------------------------------------------------------
class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        tensors = list(output_tensors or [])
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TritonModelException(f"InferenceResponse: output_tensors must be Tensors, got {type(t)}")
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException(f"InferenceResponse: error must be a TritonError, got {type(error)}")
        names = [t.name() for t in tensors]
        if len(set(names)) != len(names):
            raise TritonModelException(f"InferenceResponse: duplicate output names {names}")
        self._tensors = tensors
        self._error = error

    def output_tensors(self) -> list:
        return list(self._tensors)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error

    def __repr__(self) -> str:
        return f"InferenceResponse(error={self._error!r})" if self._error else f"InferenceResponse({self._tensors})"


def _wire_response(response: InferenceResponse | None, requested=None) -> InferenceResponse | None:
    if response is None:
        return None
    if response.has_error():
        return InferenceResponse(error=TritonError(response.error().message(), response.error().code()))
    tensors = [_wire_tensor(t) for t in response.output_tensors() if not requested or t.name() in requested]
    return InferenceResponse(output_tensors=tensors)


def get_input_tensor_by_name(inference_request, name):
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response, name):
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


# ---- logging --------------------------------------------------------------------------------------
logs: list[tuple[str, str]] = []
_logs_lock = threading.Lock()


class Logger:
    INFO, WARNING, ERROR, VERBOSE = "INFO", "WARNING", "ERROR", "VERBOSE"

    @staticmethod
    def log(message, level="INFO"):
        with _logs_lock:
            logs.append((level, str(message)))

    @staticmethod
    def log_info(message):
        Logger.log(message, Logger.INFO)

    @staticmethod
    def log_warn(message):
        Logger.log(message, Logger.WARNING)

    @staticmethod
    def log_error(message):
        Logger.log(message, Logger.ERROR)

    @staticmethod
    def log_verbose(message):
        Logger.log(message, Logger.VERBOSE)


def log_messages(level: str | None = None) -> list[str]:
    with _logs_lock:
        return [m for lvl, m in logs if level is None or lvl == level]


# ---- response sender ------------------------------------------------------------------------------
class ResponseSender:
    """What `request.get_response_sender()` returns. Records `(response, flags)` in `sent`.

    Cancellation, for tests: `cancel()`, or `cancel_when(predicate)` where `predicate(sender)` is
    asked at every `is_cancelled()` call (e.g. `lambda s: len(s.sent) >= 2`)."""

    def __init__(self, on_send=None):
        self._on_send = on_send
        self._cond = threading.Condition()
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self._closed = False
        self._cancelled = False
        self._cancel_predicate = None
        self.is_cancelled_calls = 0

    # the real API
    def send(self, response=None, flags=0):
        if response is None and flags != TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags "
                "is not equal to TRITONSERVER_RESPONSE_COMPLETE_FINAL"
            )
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"send: expected an InferenceResponse, got {type(response).__name__}")
        wired = _wire_response(response)
        with self._cond:
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            self.sent.append((wired, flags))
            self._closed = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self._cond.notify_all()
        if self._on_send is not None:
            self._on_send(wired, flags)

    def is_cancelled(self) -> bool:
        with self._cond:
            self.is_cancelled_calls += 1
            if not self._cancelled and self._cancel_predicate is not None and self._cancel_predicate(self):
                self._cancelled = True
            return self._cancelled

    # test controls and views
    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True

    def cancel_when(self, predicate) -> None:
        with self._cond:
            self._cancel_predicate = predicate

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def responses(self) -> list:
        with self._cond:
            return [r for r, _ in self.sent if r is not None]

    @property
    def final_count(self) -> int:
        with self._cond:
            return sum(1 for _, f in self.sent if f & TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def wait_final(self, timeout: float = 60.0) -> list:
        """Block until a FINAL flag was sent; returns `sent`. AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no FINAL response within {timeout}s; sent so far: {self.sent}")
                self._cond.wait(left)
            return list(self.sent)

    def wait_for(self, predicate, timeout: float = 60.0) -> bool:
        """Wait until `predicate(self)` holds (re-checked after each send); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True


# ---- model configs (config.pbtxt) and initialize() args ---------------------------------------------
_IO_RE = re.compile(
    r'\{\s*name:\s*"(?P<name>[^"]+)"\s*,\s*data_type:\s*(?P<type>TYPE_\w+)\s*,'
    r"\s*dims:\s*\[(?P<dims>[^\]]*)\](?P<rest>[^}]*)\}"
)
_PARAM_RE = re.compile(r'\{\s*key:\s*"(?P<key>[^"]+)"\s*,\s*value:\s*\{\s*string_value:\s*"(?P<value>[^"]*)"\s*\}\s*\}')


def _block(text: str, keyword: str) -> str:
    match = re.search(rf"^{keyword}\s*\[", text, re.M)
    if not match:
        return ""
    depth, start = 0, match.end() - 1
    for i in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    raise ValueError(f"unbalanced {keyword} block")


def load_config(path) -> dict:
    """The parts of a config.pbtxt the fake server checks (comments stripped)."""
    text = "\n".join(line.split("#", 1)[0] for line in Path(path).read_text().splitlines())

    def tensors(keyword):
        return {
            m["name"]: {
                "data_type": m["type"],
                "dims": [int(d) for d in m["dims"].split(",") if d.strip()],
                "optional": "optional: true" in m["rest"],
            }
            for m in _IO_RE.finditer(_block(text, keyword))
        }

    batch = re.search(r"^max_batch_size:\s*(\d+)", text, re.M)
    return {
        "name": re.search(r'^name:\s*"([^"]+)"', text, re.M).group(1),
        "max_batch_size": int(batch.group(1)) if batch else 0,
        "decoupled": bool(re.search(r"decoupled:\s*true", text)),
        "input": tensors("input"),
        "output": tensors("output"),
        "parameters": {m["key"]: m["value"] for m in _PARAM_RE.finditer(_block(text, "parameters"))},
    }


def triton_args(config: dict, instance_kind: str = "CPU", **parameters) -> dict:
    """The `args` Triton passes to `initialize`: model_config as JSON (parameters as string_value)."""
    params = {**config["parameters"], **{k: str(v) for k, v in parameters.items()}}
    model_config = {
        "name": config["name"],
        "backend": "python",
        "max_batch_size": config["max_batch_size"],
        "model_transaction_policy": {"decoupled": config["decoupled"]},
        "input": [
            {"name": n, "data_type": s["data_type"], "dims": s["dims"], "optional": s["optional"]}
            for n, s in config["input"].items()
        ],
        "output": [{"name": n, "data_type": s["data_type"], "dims": s["dims"]} for n, s in config["output"].items()],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }
    return {
        "model_config": json.dumps(model_config),
        "model_instance_kind": instance_kind,
        "model_instance_name": f"{config['name']}_0_0",
        "model_instance_device_id": "0",
        "model_name": config["name"],
        "model_version": "1",
        "model_repository": "",
    }


def _shape_ok(shape: list, dims: list) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


def check_inputs(config: dict, tensors: list) -> str | None:
    """Triton core's request checks against the model config: None if fine, else the message."""
    spec = config["input"]
    names = [t.name() for t in tensors]
    for tensor in tensors:
        name = tensor.name()
        if name not in spec:
            return f"unexpected inference input '{name}' for model '{config['name']}'"
        if tensor.triton_dtype() != spec[name]["data_type"]:
            return (
                f"inference input '{name}' data-type is '{tensor.triton_dtype()}', but model "
                f"'{config['name']}' expects '{spec[name]['data_type']}'"
            )
        shape, dims = list(tensor.as_numpy().shape), spec[name]["dims"]
        if config["max_batch_size"] > 0:
            if not shape or shape[0] > config["max_batch_size"] or shape[0] < 1:
                return f"inference input '{name}' batch size {shape[:1]} not in [1, {config['max_batch_size']}]"
            shape = shape[1:]
        if not _shape_ok(shape, dims):
            return f"unexpected shape for input '{name}' for model '{config['name']}'. Expected {dims}, got {shape}"
    if config["max_batch_size"] > 0:
        batches = {t.as_numpy().shape[0] for t in tensors}
        if len(batches) > 1:
            return f"inputs of model '{config['name']}' have different batch sizes {sorted(batches)}"
    missing = [n for n, s in spec.items() if not s["optional"] and n not in names]
    if missing:
        return f"model '{config['name']}' expects the inputs {missing} but the request has none of them"
    return None


def check_outputs(config: dict, response: InferenceResponse) -> str | None:
    """Each output of a response is declared in the config with that datatype and shape."""
    for tensor in response.output_tensors():
        spec = config["output"].get(tensor.name())
        if spec is None:
            return f"output '{tensor.name()}' is not in the config of '{config['name']}'"
        if tensor.triton_dtype() != spec["data_type"]:
            return f"output '{tensor.name()}' is {tensor.triton_dtype()}, config says {spec['data_type']}"
        shape = list(tensor.as_numpy().shape)
        if config["max_batch_size"] > 0:
            shape = shape[1:]
        if not _shape_ok(shape, spec["dims"]):
            return f"output '{tensor.name()}' has shape {shape}, config says {spec['dims']}"
    return None


# ---- requests and BLS -------------------------------------------------------------------------------
class _Registered:
    def __init__(self, model, config: dict | None):
        self.model = model
        self.config = config
        self.lock = threading.Lock()  # one instance: Triton calls its execute one batch at a time


_models: dict[str, _Registered] = {}
_models_lock = threading.Lock()


class ChildCall:
    """One BLS `exec` as the fake server saw it (kept in `bls_calls`)."""

    def __init__(self, request: InferenceRequest, decoupled: bool):
        self.model_name = request.model_name
        self.request_id = request.request_id()
        self.inputs = {t.name(): _wire_array(t.as_numpy()) for t in request.inputs()}
        self.requested_output_names = list(request.requested_output_names())
        self.decoupled = decoupled
        self.responses: list[InferenceResponse] = []  # as delivered to the caller
        self.done = threading.Event()

    def __repr__(self) -> str:
        return f"ChildCall({self.model_name!r}, id={self.request_id!r}, inputs={sorted(self.inputs)})"


bls_calls: list[ChildCall] = []
_calls_lock = threading.Lock()


def register_model(name: str, model, *, config: dict | None = None) -> None:
    """Serve `model` (anything with `execute(requests)` returning one response per request) to BLS
    calls under `name`."""
    with _models_lock:
        _models[name] = _Registered(model, config)


def clear_models() -> None:
    with _models_lock:
        _models.clear()
    with _calls_lock:
        bls_calls.clear()


def calls_to(model_name: str) -> list[ChildCall]:
    with _calls_lock:
        return [c for c in bls_calls if c.model_name == model_name]


class InferenceRequest:
    """A request as a model's `execute` receives it, and the BLS request a model builds."""

    def __init__(
        self,
        model_name: str = "",
        inputs=None,
        requested_output_names=None,
        request_id: str = "",
        correlation_id=0,
        flags: int = 0,
        timeout: int = 0,
        model_version: int = -1,
        preferred_memory=None,
        parameters=None,
    ):
        inputs = list(inputs or [])
        for t in inputs:
            if not isinstance(t, Tensor):
                raise TritonModelException(f"InferenceRequest: inputs must be Tensors, got {type(t).__name__}")
        self.model_name = model_name
        self._inputs = inputs
        self._requested = list(requested_output_names or [])
        self._request_id = request_id or ""
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = json.dumps(parameters or {})
        self._sender: ResponseSender | None = None

    # what a model sees
    def inputs(self) -> list:
        return list(self._inputs)

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self):
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return self._parameters

    def requested_output_names(self) -> list:
        return list(self._requested)

    def get_response_sender(self) -> ResponseSender:
        if self._sender is None:
            self._sender = ResponseSender()
        return self._sender

    def is_cancelled(self) -> bool:
        return self._sender is not None and self._sender.is_cancelled()

    # BLS
    def exec(self, decoupled: bool = False):
        call = ChildCall(self, decoupled)
        with _calls_lock:
            bls_calls.append(call)
        if decoupled:
            raise TritonModelException(
                "fake: exec(decoupled=True) is not supported: the serving code must not "
                "make decoupled BLS calls (Triton 2.51 defect, serving/decoder_link.py)"
            )
        with _models_lock:
            entry = _models.get(self.model_name)
        if entry is None:
            return self._answer(
                call,
                _error(
                    f"Failed for execute the inference request. Model '{self.model_name}' is not ready.",
                    TritonError.NOT_FOUND,
                ),
            )
        problem = check_inputs(entry.config, self._inputs) if entry.config else None
        if problem:
            return self._answer(call, _error(problem, TritonError.INVALID_ARG))
        child = InferenceRequest(
            self.model_name,
            [_wire_tensor(t) for t in self._inputs],
            self._requested,
            self._request_id,
            self._correlation_id,
            self._flags,
            self._timeout,
        )
        try:
            with entry.lock:
                replies = entry.model.execute([child])
            if not isinstance(replies, list) or len(replies) != 1:
                raise TritonModelException(f"execute must return one response per request, got {replies!r}")
            reply = _wire_response(replies[0], set(self._requested))
        except Exception as exc:  # noqa: BLE001 - the stub turns it into an error response
            reply = _error(
                f"Failed to process the request(s) for model '{self.model_name}', message: {exc}", TritonError.INTERNAL
            )
        return self._answer(call, reply)

    @staticmethod
    def _answer(call: ChildCall, reply: InferenceResponse):
        call.responses.append(reply)
        call.done.set()
        return reply


def _error(message: str, code: int) -> InferenceResponse:
    return InferenceResponse(error=TritonError(message, code))


def make_request(inputs: dict, request_id: str = "", config: dict | None = None) -> InferenceRequest:
    """A client request: `inputs` maps names to numpy arrays (or str/bytes/lists of them for STRING).
    With `config`, the inputs are checked as Triton would before the model sees them."""
    tensors = []
    for name, value in inputs.items():
        if isinstance(value, (str, bytes)) or (
            isinstance(value, list) and value and isinstance(value[0], (str, bytes))
        ):
            items = value if isinstance(value, list) else [value]
            array = np.empty(len(items), dtype=np.object_)
            array[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in items]
        else:
            array = np.asarray(value)
        tensors.append(Tensor(name, _wire_array(array)))
    if config is not None:
        problem = check_inputs(config, tensors)
        if problem:
            raise ValueError(problem)
    return InferenceRequest(config["name"] if config else "", tensors, [], request_id)


# ---- metrics ----------------------------------------------------------------------------------------
class _Store:
    def __init__(self, kind: int, buckets):
        self.kind = kind
        self.buckets = list(buckets) if buckets is not None else None
        self.value = 0.0
        self.observations: list[float] = []
        self.lock = threading.Lock()


_families: dict[str, dict] = {}  # name -> {"kind", "description", "metrics": {labels: _Store}}
_metrics_lock = threading.Lock()


def _labels_key(labels: dict) -> tuple:
    return tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))


class MetricFamily:
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, name: str, description: str, kind: int):
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(f"MetricFamily {name!r}: unknown kind {kind!r}")
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise TritonModelException(f"MetricFamily: invalid metric name {name!r}")
        with _metrics_lock:
            family = _families.setdefault(name, {"kind": kind, "description": description, "metrics": {}})
            if family["kind"] != kind:
                raise TritonModelException(f"MetricFamily {name!r} already exists with a different kind")
        self._name = name
        self._kind = kind

    def Metric(self, labels=None, buckets=None) -> Metric:  # noqa: N802 - the real API's name
        if self._kind == self.HISTOGRAM and buckets is None:
            raise TritonModelException(f"{self._name}: histogram metrics need buckets")
        if self._kind != self.HISTOGRAM and buckets is not None:
            raise TritonModelException(f"{self._name}: only histogram metrics take buckets")
        if buckets is not None and list(buckets) != sorted(buckets):
            raise TritonModelException(f"{self._name}: buckets must be increasing")
        key = _labels_key(labels)
        with _metrics_lock:
            store = _families[self._name]["metrics"].setdefault(key, _Store(self._kind, buckets))
        return Metric(self._name, self._kind, store)


class Metric:
    def __init__(self, family: str, kind: int, store: _Store):
        self._family = family
        self._kind = kind
        self._store = store

    def increment(self, value) -> None:
        if self._kind == MetricFamily.HISTOGRAM:
            raise TritonModelException(f"{self._family}: increment() on a histogram")
        if self._kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException(f"{self._family}: a counter cannot be decremented (value {value})")
        with self._store.lock:
            self._store.value += float(value)

    def set(self, value) -> None:
        if self._kind != MetricFamily.GAUGE:
            raise TritonModelException(f"{self._family}: set() is only for gauges")
        with self._store.lock:
            self._store.value = float(value)

    def observe(self, value) -> None:
        if self._kind != MetricFamily.HISTOGRAM:
            raise TritonModelException(f"{self._family}: observe() is only for histograms")
        with self._store.lock:
            self._store.observations.append(float(value))

    def value(self) -> float:
        if self._kind == MetricFamily.HISTOGRAM:
            raise TritonModelException(f"{self._family}: value() is not supported for histograms")
        with self._store.lock:
            return self._store.value


def _store(name: str, labels: dict) -> _Store:
    with _metrics_lock:
        family = _families.get(name)
        if family is None:
            raise KeyError(f"no metric family {name!r}; known: {sorted(_families)}")
        store = family["metrics"].get(_labels_key(labels))
        if store is None:
            raise KeyError(f"{name}: no metric with labels {labels}; known: {list(family['metrics'])}")
        return store


def metric_value(name: str, **labels) -> float:
    store = _store(name, labels)
    with store.lock:
        return store.value


def histogram_observations(name: str, **labels) -> list[float]:
    store = _store(name, labels)
    with store.lock:
        return list(store.observations)


def metric_families() -> dict[str, int]:
    with _metrics_lock:
        return {name: f["kind"] for name, f in _families.items()}


def reset_metrics() -> None:
    with _metrics_lock:
        _families.clear()
