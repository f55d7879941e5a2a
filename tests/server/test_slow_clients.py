"""Slow-header clients are timed out: raw sockets against a real server with a 1 s request-head deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.server import LiveServer

HEAD_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("slow") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}", env={"MHPO_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S)}) as live:
        yield live


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout is a safety net only)."""
    sock.settimeout(60)
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_that_never_finishes_its_headers_gets_408(server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply


def test_a_trickling_client_is_cut_off_at_the_deadline(server: LiveServer) -> None:
    """One byte every 0.2 s keeps a per-read timeout happy; the deadline covers the whole head."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sent = 0
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.2)
        except OSError:
            pass  # the server closed the connection under us
        reply = read_all(sock)
    assert sent < len(head) and reply.startswith(b"HTTP/1.1 408 "), (sent, reply)


def test_a_silent_connection_is_closed_and_others_are_served(server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # served while the idle one waits
        assert read_all(idle).startswith(b"HTTP/1.1 408 ")


def test_keep_alive_requests_within_the_deadline_are_served(server: LiveServer) -> None:
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(f"{server.url}/healthz").status_code == 200
            time.sleep(HEAD_TIMEOUT_S * 1.5)  # idle time between requests does not count against the head deadline
