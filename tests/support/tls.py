"""A throwaway CA and a server certificate it signed, for TLS tests (trustme)."""

from __future__ import annotations

import trustme


def make_ca(directory, name: str):
    """A CA and a server certificate for 127.0.0.1/localhost as PEM files: (ca.pem, server.pem, server.key)."""
    directory.mkdir()
    ca = trustme.CA(organization_name=name)
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(paths[0]))
    server.cert_chain_pems[0].write_to_path(str(paths[1]))
    server.private_key_pem.write_to_path(str(paths[2]))
    return paths
