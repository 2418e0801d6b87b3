"""gRPC streaming (Triton's ModelStreamInfer) to the decoupled model `minigpt5`, sync and asyncio.

Each transport keeps one channel for the client's lifetime (TLS and its handshake happen once) and
makes one call per request; gRPC channels are thread-safe, so one sync client serves many threads.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from .connection import Connection
from .contract import MODEL_NAME
from .errors import MiniGPT5Error, from_grpc_status
from .events import Event, events_from_outputs
from .request import GenerateRequest

# Images travel in the messages: no 4 MiB cap either way (Triton's own clients lift it the same way).
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class GrpcTransport:
    """Synchronous: one channel, one streaming call per request."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._channel = _channel(grpc, connection)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def stream(self, request: GenerateRequest, timeout: float) -> Iterator[Event]:
        call = self._stub.ModelStreamInfer(
            iter([_infer_request(request)]), timeout=timeout, metadata=tuple(self.connection.headers.items())
        )
        answer = _Answer(self.connection)
        try:
            for response in call:  # to the end of the call, which Triton ends once the answer is complete
                yield from answer.events(response)
            answer.finished = True
        except grpc.RpcError as error:
            answer.finished = True
            raise _rpc_error(error, self.connection) from None
        finally:
            # Cancel only a request abandoned early: Triton 2.51's gRPC frontend can crash when a stream
            # whose request already completed is cancelled ("HandleCancellation called even when the
            # context was not cancelled", fixed upstream in 25.x).
            if not answer.finished:
                call.cancel()
        answer.raise_failure()

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    """asyncio: one channel for the client's lifetime, one call per request."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._channel = None  # made on first use, inside the event loop

    async def stream(self, request: GenerateRequest, timeout: float) -> AsyncIterator[Event]:
        if self._channel is None:
            self._channel = _channel(grpc.aio, self.connection)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # Ending the request side right away is fine: Triton ends the call once the answer is complete.
        call = stub.ModelStreamInfer(
            iter([_infer_request(request)]), timeout=timeout, metadata=tuple(self.connection.headers.items())
        )
        answer = _Answer(self.connection)
        try:
            async for response in call:
                for event in answer.events(response):
                    yield event
            answer.finished = True
        except grpc.RpcError as error:  # grpc.aio raises the call's final status from the iterator
            answer.finished = True
            raise _rpc_error(error, self.connection) from None
        finally:
            if not answer.finished:
                call.cancel()  # the request was abandoned early
        answer.raise_failure()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _channel(module, connection: Connection):
    """A channel of `grpc` or `grpc.aio` to the server, over TLS when the connection says so."""
    if connection.tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=connection.ca_pem())
        return module.secure_channel(connection.address, credentials, options=_CHANNEL_OPTIONS)
    return module.insecure_channel(connection.address, options=_CHANNEL_OPTIONS)


def _infer_request(request: GenerateRequest) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    # The empty final response marks the end of the request even if the last event lacks the flag.
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, array in request.tensors().items():
        datatype = np_to_triton_dtype(array.dtype)
        message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        message.raw_input_contents.append(
            serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        )
    return message


class _Answer:
    """The responses of one call: their events up to the final one. An error in the stream ends the
    request but not the call, which Triton then ends by itself: it is kept and raised at the end."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.final = False
        self.finished = False  # the call ended (nothing to cancel)
        self.failure: MiniGPT5Error | None = None

    def events(self, response: service_pb2.ModelStreamInferResponse) -> list[Event]:
        if response.error_message:
            self.failure = self.failure or _error_from_status(None, response.error_message, self.connection)
        if self.failure or self.final:
            return []
        result = grpcclient.InferResult(response.infer_response)
        flag = response.infer_response.parameters.get("triton_final_response")
        self.final = flag is not None and flag.bool_param

        def output(name: str) -> list:
            array = result.as_numpy(name)
            if array is None:
                return []
            return [
                item.decode("utf-8", "replace") if isinstance(item, bytes) else item for item in array.ravel().tolist()
            ]

        return events_from_outputs(output)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def _rpc_error(error: grpc.RpcError, connection: Connection) -> MiniGPT5Error:
    return _error_from_status(str(error.code()), error.details() or "", connection)


# gRPC says UNAVAILABLE for "busy" and for "no connection" alike; these say the connection failed (TLS too).
_CONNECTION_FAILURES = ("failed to connect", "handshake", "certificate", "ssl")


def _error_from_status(status: str | None, message: str, connection: Connection) -> MiniGPT5Error:
    listening = True
    if (status or "").endswith("UNAVAILABLE"):
        lowered = message.lower()
        listening = not any(marker in lowered for marker in _CONNECTION_FAILURES) and _accepts_connections(
            connection.address
        )
    return from_grpc_status(status, message, connection.url, listening)


def _accepts_connections(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
