"""A small stand-in sidecar: a real ZeroMQ ROUTER on loopback that records what a client sends and answers
the way a test tells it (ACK, REJECT with a reason, a bogus ACK). For replies the real sidecar will only
send in faults, or before its support for them lands; the end-to-end versions use the real sidecar."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import zmq

from protocol import Header, Kind, encode, split

#: ``reply(header, peer_state) -> list of (kind, seq, body, incarnation) to send back``
Reply = Callable[[Header, "FakePeer"], list[tuple[Kind, int, dict[str, Any], str]]]


def ack_everything(header: Header, peer: "FakePeer") -> list[tuple[Kind, int, dict[str, Any], str]]:
    if header.kind is Kind.HEARTBEAT:
        return []
    return [(Kind.ACK, header.seq, {"delivered": None}, header.incarnation)]


class FakePeer:
    def __init__(self, reply: Reply = ack_everything) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self.reply = reply
        self.received: list[Header] = []  # every message, heartbeats included, in arrival order
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FakePeer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()

    def headers(self, kind: Kind | None = None) -> list[Header]:
        with self.lock:
            return [h for h in self.received if kind is None or h.kind is kind]

    def wait_for(self, predicate: Callable[["FakePeer"], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout} s; received {len(self.received)} messages")
            time.sleep(0.02)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            peer, *frames = self.sock.recv_multipart()
            for header, _body in split(frames):
                with self.lock:
                    self.received.append(header)
                for kind, seq, body, incarnation in self.reply(header, self):
                    self.sock.send_multipart([peer, *encode(kind, header.run_id, seq, time.time(), body, incarnation)])
