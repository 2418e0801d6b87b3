"""gRPC streaming (Triton's ModelStreamInfer) to the decoupled model `minigpt5`, sync and asyncio."""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .errors import MiniGPT5Error, Timeout, from_grpc_status
from .events import Event, events_from_outputs
from .request import MODEL_NAME, GenerateRequest


class GrpcTransport:
    """Synchronous: one short-lived gRPC stream per request (a tritonclient client holds one stream at a time)."""

    def __init__(self, url: str):
        self.url = url

    def stream(self, request: GenerateRequest, timeout: float) -> Iterator[Event]:
        responses: queue.SimpleQueue = queue.SimpleQueue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False
        try:
            client.start_stream(
                callback=lambda result, error: responses.put((result, error)),
                stream_timeout=timeout,
            )
            try:
                # The empty final response marks the end of the request even if the last event lacks the flag.
                client.async_stream_infer(MODEL_NAME, _inputs(request), enable_empty_final_response=True)
            except InferenceServerException as enqueue_error:
                # The stream died first (no server, say): the real status comes through the callback.
                try:
                    _, error = responses.get(timeout=1.0)
                except queue.Empty:
                    error = None
                raise _error(error or enqueue_error, self.url) from None
            deadline = time.monotonic() + timeout
            while True:
                try:
                    result, error = responses.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise Timeout(f"no answer from {self.url} within {timeout:g} s") from None
                if error is not None:
                    finished = True  # an error response ends its request; the stream itself stays open
                    raise _error(error, self.url)
                yield from _events(result)
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    return
        except InferenceServerException as error:
            raise _error(error, self.url) from None
        finally:
            # Cancel only a request abandoned early: Triton 2.51's gRPC frontend can crash when a stream
            # whose request already completed is cancelled ("HandleCancellation called even when the
            # context was not cancelled", fixed upstream in 25.x).
            client.stop_stream(cancel_requests=not finished)
            client.close()


class AsyncGrpcTransport:
    """asyncio: one gRPC channel for the client's lifetime, one call per request."""

    def __init__(self, url: str):
        self.url = url
        self._client: grpcclient_aio.InferenceServerClient | None = None

    async def stream(self, request: GenerateRequest, timeout: float) -> AsyncIterator[Event]:
        if self._client is None:
            self._client = grpcclient_aio.InferenceServerClient(self.url)

        async def the_request():
            # Ending the request side right away is fine: Triton ends the call once the answer is complete.
            yield {"model_name": MODEL_NAME, "inputs": _inputs(request)}

        responses = self._client.stream_infer(the_request(), stream_timeout=timeout)
        failure = None
        try:
            async for result, error in responses:
                if error is not None:  # in-band: the request is over; let the call end without a cancel
                    failure = failure or _error(error, self.url)
                elif failure is None:
                    for event in _events(result):
                        yield event
            if failure is not None:
                raise failure
        except grpc.RpcError as error:  # grpc.aio raises the call's final status from the iterator
            raise _error_from_status(str(error.code()), error.details() or "", self.url) from None
        except InferenceServerException as error:
            raise _error(error, self.url) from None
        finally:
            responses.cancel()  # a no-op once the call is done; cancels the request if abandoned early

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _inputs(request: GenerateRequest) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in request.tensors().items():
        infer_input = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def _events(result: grpcclient.InferResult) -> list[Event]:
    def output(name: str) -> list:
        array = result.as_numpy(name)
        if array is None:
            return []
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else item for item in array.ravel().tolist()]

    return events_from_outputs(output)


def _error(error: InferenceServerException, url: str) -> MiniGPT5Error:
    return _error_from_status(error.status(), error.message() or "", url)


def _error_from_status(status: str | None, message: str, url: str) -> MiniGPT5Error:
    listening = _accepts_connections(url) if (status or "").endswith("UNAVAILABLE") else True
    return from_grpc_status(status, message, url, listening)


def _accepts_connections(url: str, timeout: float = 2.0) -> bool:
    host, _, port = url.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
