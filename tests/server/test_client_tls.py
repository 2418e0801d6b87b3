"""The client against the real tritonserver serving gRPC over TLS (Triton's --grpc-use-ssl, a throwaway
CA made with trustme) with the inference protocol restricted to requests carrying a header (Triton's
--grpc-restricted-protocol, which expects the header `triton-grpc-protocol-KEY`): the client's TLS,
custom CA and extra headers as Triton sees them."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from minigpt5.launcher.local import LocalServer
from minigpt5.launcher.process import ADMIN_HEADER, RESTRICTED_APIS
from minigpt5_client import AsyncClient, Client, ServerError, ServerUnreachable
from support.tls import make_ca

TENANT_HEADER = "x-tenant-key"
SENT_HEADER = f"triton-grpc-protocol-{TENANT_HEADER}"  # what Triton expects for a restricted protocol
TENANT_KEY = secrets.token_hex(8)


@pytest.fixture(scope="module")
def tls_triton(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-triton")
    ca, cert, key = make_ca(root / "ca", "test CA")
    other_ca, _, _ = make_ca(root / "other", "another CA")
    admin_key = secrets.token_urlsafe(16)
    server = LocalServer(
        tiny_weights,
        workdir=root / "server",
        name="tls",
        admin_key=admin_key,
        extra_args=[
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={cert}",
            f"--grpc-server-key={key}",
            f"--grpc-restricted-protocol=inference:{TENANT_HEADER}={TENANT_KEY}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}",
        ],
    )
    try:
        server.start(timeout=300)
    except RuntimeError as error:
        pytest.fail(str(error))
    yield f"grpcs://{server.grpc_url}", str(ca), str(other_ca)
    server.stop()


def test_grpcs_with_custom_ca_and_header(tls_triton):
    url, ca, _ = tls_triton
    with Client(url, ca_cert=ca, headers={SENT_HEADER: TENANT_KEY}) as client:
        documents = [client.generate("Tell a story", max_tokens=8, seed=seed) for seed in (1, 2)]
    assert all(document.usage["completion_tokens"] >= 1 for document in documents)


def test_async_grpcs_with_custom_ca_and_header(tls_triton):
    url, ca, _ = tls_triton

    async def session():
        async with AsyncClient(url, ca_cert=ca, headers={SENT_HEADER: TENANT_KEY}) as client:
            return await client.generate("Tell a story", max_tokens=8, seed=1)

    assert asyncio.run(session()).usage["completion_tokens"] >= 1


def test_triton_refuses_a_request_without_the_header(tls_triton):
    url, ca, _ = tls_triton
    with pytest.raises(ServerError, match=f"refused.*{SENT_HEADER}"), Client(url, ca_cert=ca, retries=2) as client:
        client.generate("Tell a story", max_tokens=8)


def test_a_server_certificate_of_another_ca_is_refused(tls_triton):
    url, _, other_ca = tls_triton
    with pytest.raises(ServerUnreachable), Client(url, ca_cert=other_ca) as client:
        client.generate("Tell a story", max_tokens=8)
