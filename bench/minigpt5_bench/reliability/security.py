"""The restricted APIs without and with the admin header; inference stays open."""

from __future__ import annotations

from .wire import MODEL, SHORT, grpc_request, grpc_status, grpc_tensors, http_get_status, http_request

RESTRICTED_HTTP = (
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", f"/v2/repository/models/{MODEL}/unload", b"{}"),
    ("POST", f"/v2/repository/models/{MODEL}/load", b'{"parameters": {"config": "{}"}}'),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/x/register", b'{"key": "/dev/shm/x", "offset": 0, "byte_size": 8}'),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("POST", "/v2/trace/setting", b'{"trace_file": "/tmp/minigpt5-trace"}'),
    ("POST", "/v2/logging", b'{"log_file": "/tmp/minigpt5-log"}'),
)


def probe_security(server, admin_key: str | None = None) -> dict:
    """The restricted APIs are refused without the admin header (HTTP 403, gRPC UNAVAILABLE 'restricted');
    inference, health, metadata and statistics stay open; with the key the repository index answers."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from minigpt5.launcher.process import ADMIN_HEADER

    http_rows = []
    for method, path, body in RESTRICTED_HTTP:
        outcome = http_request(server.http_url, path, body or b"", method=method, timeout=30)
        http_rows.append({"method": method, "path": path, "status": outcome.status, "message": outcome.message[:200]})
    client = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_rows = []
    calls = {
        "RepositoryIndex": lambda **kw: client.get_model_repository_index(**kw),
        "RepositoryModelUnload": lambda **kw: client.unload_model(MODEL, **kw),
        "SystemSharedMemoryStatus": lambda **kw: client.get_system_shared_memory_status(**kw),
        "SystemSharedMemoryRegister": lambda **kw: client.register_system_shared_memory("x", "/x", 8, **kw),
        "CudaSharedMemoryStatus": lambda **kw: client.get_cuda_shared_memory_status(**kw),
        "TraceSetting": lambda **kw: client.update_trace_settings(settings={"trace_file": "/tmp/x"}, **kw),
        "LogSettings": lambda **kw: client.get_log_settings(**kw),
    }
    for name, call in calls.items():
        try:
            call()
            grpc_rows.append({"rpc": name, "status": "ok", "message": ""})
        except InferenceServerException as exc:
            grpc_rows.append({"rpc": name, "status": grpc_status(exc), "message": (exc.message() or "")[:200]})
    open_apis = {
        "health_ready": http_get_status(server.http_url, "/v2/health/ready"),
        "model_metadata": http_get_status(server.http_url, f"/v2/models/{MODEL}"),
        "statistics": http_get_status(server.http_url, f"/v2/models/{MODEL}/stats"),
        "grpc_server_ready": client.is_server_ready(),
    }
    client.close()
    with_key = None
    if admin_key:
        with_key = {
            "http_repository_index": http_request(
                server.http_url, "/v2/repository/index", b"{}", headers={ADMIN_HEADER: admin_key}, timeout=30
            ).status
        }
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            client.get_model_repository_index(headers={f"triton-grpc-protocol-{ADMIN_HEADER}": admin_key})
            with_key["grpc_repository_index"] = "ok"
        except InferenceServerException as exc:
            with_key["grpc_repository_index"] = grpc_status(exc)
        finally:
            client.close()
    refused_http = sum(r["status"] == "403" and "restricted" in r["message"] for r in http_rows)
    refused_grpc = sum("restricted" in r["message"] for r in grpc_rows)
    return {
        "http": http_rows,
        "grpc": grpc_rows,
        "refused": refused_http + refused_grpc,
        "tried": len(http_rows) + len(grpc_rows),
        "open": open_apis,
        "with_admin_key": with_key,
        "inference": grpc_request(server.grpc_url, grpc_tensors(SHORT)).ok,
    }
