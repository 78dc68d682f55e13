"""CurveZMQ key files (made by ``wandb-sidecar keys``), shared by the client, the status command and the
sidecar. pyzmq's ``zmq.auth`` does the work; this only names the conventions."""

from __future__ import annotations

import os
from typing import Any

import zmq.auth

#: Environment variables naming key files, so a training config needs no key paths.
SERVER_KEY_ENV = "WANDB_SIDECAR_SERVER_KEY"  # the server's public key file (``server.key``)
CLIENT_KEY_ENV = "WANDB_SIDECAR_CLIENT_KEY"  # this client's secret key file (``client.key_secret``)


ClientKeys = tuple[bytes, bytes, bytes]  # server public, client public, client secret


def load_client_keys(server_key_file: str | None, client_key_file: str | None) -> ClientKeys | None:
    """Read the key files (given, or named by the environment); None when CurveZMQ is not in use.

    Raises ValueError/OSError for unusable files: a configuration error, reported at start-up."""
    server_key_file = server_key_file or os.environ.get(SERVER_KEY_ENV)
    client_key_file = client_key_file or os.environ.get(CLIENT_KEY_ENV)
    if not server_key_file and not client_key_file:
        return None
    if not server_key_file or not client_key_file:
        raise ValueError(f"CurveZMQ needs both the server's public key ({SERVER_KEY_ENV}) and this client's "
                         f"secret key ({CLIENT_KEY_ENV})")
    server_public, _ = zmq.auth.load_certificate(server_key_file)
    public, secret = zmq.auth.load_certificate(client_key_file)
    if secret is None:
        raise ValueError(f"{client_key_file} holds no secret key (use the .key_secret file)")
    return server_public, public, secret


def apply_client_keys(sock: Any, keys: ClientKeys | None) -> None:
    """Make ``sock`` a CurveZMQ client (before ``connect``)."""
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
