"""uvicorn's HTTP protocol with a deadline for the request head (line and headers).

uvicorn times out idle keep-alive connections, but a client that connects and then sends
its headers a byte at a time holds a connection (and a file descriptor) for as long as it
likes. Here each request head must arrive within `header_timeout_s` of the connection
(or, on a kept-alive connection, of the request's first byte); otherwise the server
answers 408 and closes the connection. Bodies are not covered (a large upload may take
its time).
"""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _response_408(seconds: float) -> bytes:
    body = f"request headers not received within {seconds:g} s (MHPO_HEADER_TIMEOUT_S)".encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        + f"content-length: {len(body)}\r\n".encode()
        + b"connection: close\r\n\r\n"
        + body
    )


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """Set `header_timeout_s` on a subclass (see `with_header_timeout`); by import path
    (`mhpo serve --workers N`) the deadline comes from MHPO_HEADER_TIMEOUT_S."""

    header_timeout_s: float = float(os.environ.get("MHPO_HEADER_TIMEOUT_S", "10"))
    _head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_response_408(self.header_timeout_s))
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to pass as `uvicorn.run(http=...)`."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})
