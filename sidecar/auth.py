"""Who may talk to the sidecar: only those who may send may also read its status.

- The default ``ipc://`` socket lives in a directory of mode 0700 owned by the sidecar's user: only that
  user (and root) can connect. The sidecar creates that directory, and refuses a socket directory another
  user owns or others can enter (someone could have prepared it to listen in).
- TCP, loopback included (every local user can reach 127.0.0.1), needs CurveZMQ keys (encryption and
  client authentication by public key, pyzmq's ``zmq.auth``) unless the operator says ``--insecure``.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("sidecar.auth")


class InsecureBindRefused(RuntimeError):
    """A bind other users could reach, without keys and without ``--insecure``."""


def ipc_dir_problem(addr: str, create: bool = True) -> str:
    """'' when the directory of an ``ipc://`` address is private to this user (made 0700 if missing), else
    what is wrong with it."""
    directory = Path(addr.partition("://")[2]).parent
    if create:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create the socket directory {directory}: {exc}"
    try:
        info = os.lstat(directory)
    except OSError as exc:
        return f"cannot use the socket directory {directory}: {exc}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_uid != os.getuid():
        return f"the socket directory {directory} belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & 0o077:
        return (f"the socket directory {directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); "
                "it must be 0700")
    return ""


def is_local(addr: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    scheme, _, rest = addr.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from outside


class CurveServer:
    """Configure a ROUTER socket as a CurveZMQ server that accepts only the authorised client keys."""

    def __init__(self, secret_key_file: str, authorized_keys_dir: str) -> None:
        public, secret = zmq.auth.load_certificate(secret_key_file)
        if secret is None:
            raise ValueError(f"{secret_key_file} holds no secret key (use the server's .key_secret file)")
        if not Path(authorized_keys_dir).is_dir():
            raise ValueError(f"authorised keys directory {authorized_keys_dir} does not exist")
        self.public, self.secret = public, secret
        self.authorized_keys_dir = authorized_keys_dir
        self.auth: ThreadAuthenticator | None = None

    def __call__(self, ctx: zmq.Context, sock: Any) -> None:
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("sidecar.auth.zap"))
        self.auth.start()
        self.auth.configure_curve(domain="*", location=self.authorized_keys_dir)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        n = len(list(Path(self.authorized_keys_dir).glob("*.key")))
        log.info("CurveZMQ on: %d authorised client key(s) in %s", n, self.authorized_keys_dir)

    def close(self) -> None:
        """Stop the authenticator thread (its socket would keep the context from terminating)."""
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def socket_security(bind: str, secret_key_file: str | None, authorized_keys_dir: str | None,
                    insecure: bool) -> CurveServer | None:
    """Decide how the sidecar's socket is protected; refuse a bind other users could reach unprotected."""
    scheme = bind.partition("://")[0]
    if scheme == "ipc":
        problem = ipc_dir_problem(bind)
        if problem and not insecure:
            raise InsecureBindRefused(f"refusing to bind {bind}: {problem}. Other users could reach or watch this "
                                      "socket; remove or fix that directory, bind elsewhere, or pass --insecure.")
    if secret_key_file or authorized_keys_dir:
        if not (secret_key_file and authorized_keys_dir):
            raise InsecureBindRefused("CurveZMQ needs both --curve-secret-key and --curve-authorized-keys")
        return CurveServer(secret_key_file, authorized_keys_dir)
    if scheme in ("ipc", "inproc") and not insecure:
        return None
    if not insecure:
        where = "every local user can reach it" if is_local(bind) else "anyone who reaches it"
        raise InsecureBindRefused(
            f"refusing to bind {bind} without authentication: {where}, and could make this sidecar upload "
            "files with your wandb key. Use the default owner-only ipc:// socket, give --curve-secret-key and "
            "--curve-authorized-keys (make them with `wandb-sidecar keys`), or pass --insecure on a network "
            "you trust.")
    log.warning("!!! INSECURE: %s is open to anyone who can reach it, without authentication or encryption "
                "(--insecure). Any peer can log to your wandb runs and have allowed files uploaded. !!!", bind)
    return None


def make_keys(directory: str, name: str, owner: str | None = None) -> tuple[str, str]:
    """Write ``name.key`` (public, give it out) and ``name.key_secret`` (keep it: 0600) into ``directory``.

    ``owner`` ("USER[:GROUP]", names or numbers) gives both files to whoever must read the secret key:
    keys made by root for the sidecar's container (uid 1000) are otherwise unreadable there. Changing the
    owner to another user needs root; a failure removes the half-made pair and raises PermissionError."""
    uid, gid = _owner_ids(owner) if owner else (-1, -1)
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    if owner:
        try:
            for path in (public, secret):
                os.chown(path, uid, gid)
        except PermissionError as exc:
            for path in (public, secret):
                Path(path).unlink(missing_ok=True)
            raise PermissionError(f"cannot give {name}'s keys to {owner} ({exc.strerror}): only root can; run "
                                  "`wandb-sidecar keys` as root (in the image: `docker compose run --user 0 ...`)") from exc
    return public, secret


def _owner_ids(owner: str) -> tuple[int, int]:
    """"USER[:GROUP]", names or numbers, to (uid, gid); gid -1 (left as it is) when GROUP is left out."""
    user, _, group = owner.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        raise ValueError(f"no such user or group here: {owner!r} (give numbers for those of another machine)") from None
    return uid, gid
