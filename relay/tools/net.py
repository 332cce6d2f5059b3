"""Loopback networking of the tools and tests: a free port, one request and its answer, a GET
on the relay's probe port."""

from __future__ import annotations

import asyncio
import contextlib
import socket


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port (TCP by default, ``SOCK_DGRAM`` for UDP) nobody uses right now.

    Also serves as a closed port: nothing listens on it until someone binds it.
    """
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def exchange(port: int, request: bytes, timeout_s: float) -> bytes:
    """Send ``request`` on a new connection to 127.0.0.1:``port`` and read until the server
    closes it: everything it answered. TimeoutError after ``timeout_s`` for the whole."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """GET on the relay's probe port (HTTP/1.0, no keep-alive): status and body."""
    request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()
    data = await exchange(port, request, timeout_s)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode()
