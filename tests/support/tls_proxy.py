"""TLS in front of a plain TCP port, as a load balancer or ingress puts it in front of Triton: a test CA
(trustme) signs the proxy's certificate for 127.0.0.1. It counts the connections it accepts and keeps
the first bytes each one sent after the handshake (an HTTP/1.1 request's head is readable there)."""

from __future__ import annotations

import asyncio
import ssl
import threading

import trustme

HEAD_BYTES = 16384


class TlsProxy:
    def __init__(self, target_port: int, tmp_path):
        self.ca = trustme.CA()
        self.ca_file = tmp_path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        context.set_alpn_protocols(["h2", "http/1.1"])  # gRPC needs h2 negotiated
        self.target_port = target_port
        self.connections = 0
        self.heads: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(context, started), daemon=True).start()
        started.wait(10)

    def _run(self, context: ssl.SSLContext, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context))
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        head = bytearray()
        self.heads.append(head)  # filled as the client sends
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pump(source, sink, keep: bytearray | None) -> None:
            try:
                while data := await source.read(65536):
                    if keep is not None and len(keep) < HEAD_BYTES:
                        keep.extend(data[: HEAD_BYTES - len(keep)])
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, upstream_writer, head), pump(upstream_reader, writer, None))

    def head_lines(self) -> list[str]:
        """The header lines of every HTTP/1.1 request head seen, lower-cased."""
        return [
            line.lower()
            for head in self.heads
            for line in bytes(head).split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        ]

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
