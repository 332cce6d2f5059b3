"""The HTTP endpoint of the daemon: ``/metrics``, ``/livez`` and ``/readyz``.

A deliberately tiny HTTP/1.0 responder on asyncio streams: three GET paths, no keep-alive,
bounded: a request line and headers of at most ``MAX_REQUEST_BYTES``, ``request_timeout_s`` to
send them, at most ``max_connections`` at a time (more are answered 503 and closed).
``/livez`` answers from the event-loop heartbeat only; ``/readyz`` from the state the relay's
own loops keep (no connection per request), with short reason codes (details are in the logs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import prometheus_client
import structlog

from relay import config, pacing

log = structlog.get_logger(__name__)

ReadyCheck = Callable[[], Awaitable[dict[str, str]]]
MAX_REQUEST_BYTES = 8192


class Heartbeat:
    """Proves the event loop runs: a task bumps ``last`` every ``period_s``."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.last = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        await pacing.periodic("heartbeat", stop, self.period_s, self.beat)

    async def beat(self) -> None:
        self.last = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self.last


class ProbeServer:
    def __init__(
        self, settings: config.HttpSettings, heartbeat: Heartbeat, ready: ReadyCheck
    ) -> None:
        self._settings = settings
        self._heartbeat = heartbeat
        self._ready = ready
        self._server: asyncio.Server | None = None
        self._open = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("probe server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._settings.host, self._settings.port, limit=MAX_REQUEST_BYTES
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > self._settings.max_connections:
                await self._respond(writer, ("503 Service Unavailable", "text/plain", b"busy\n"))
                # read what the client sent, so that closing does not reset the connection
                # before it reads the answer
                async with asyncio.timeout(1):
                    await reader.read(MAX_REQUEST_BYTES)
                return
            try:
                async with asyncio.timeout(self._settings.request_timeout_s):
                    request = await self._read_request(reader)
            except ValueError:  # over MAX_REQUEST_BYTES
                response = ("431 Request Header Fields Too Large", "text/plain", b"too large\n")
                await self._respond(writer, response)
                return
            await self._respond(writer, await self._route(request))
        except (TimeoutError, ConnectionError):
            pass  # a slow or vanished client: nothing to answer
        finally:
            self._open -= 1
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bytes:
        """The request line; the headers are read (bounded) and ignored."""
        total = 0
        request = await reader.readline()
        line = request
        while line.strip():
            total += len(line)
            if total > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            line = await reader.readline()
        return request

    async def _respond(
        self, writer: asyncio.StreamWriter, response: tuple[str, str, bytes]
    ) -> None:
        status, content_type, body = response
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        async with asyncio.timeout(self._settings.request_timeout_s):
            await writer.drain()

    async def _route(self, request: bytes) -> tuple[str, str, bytes]:  # noqa: PLR0911 - router
        parts = request.decode("latin-1").split()
        if len(parts) < 2 or parts[0] != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            return (
                "200 OK",
                prometheus_client.CONTENT_TYPE_LATEST,
                prometheus_client.generate_latest(),
            )
        if path == "/livez":
            age = self._heartbeat.age_s()
            if age > self._settings.liveness_stale_s:
                return (
                    "503 Service Unavailable",
                    "text/plain",
                    f"heartbeat {age:.1f}s old\n".encode(),
                )
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            problems = await self._ready()
            if problems:
                text = "".join(f"{name}: {why}\n" for name, why in sorted(problems.items()))
                return "503 Service Unavailable", "text/plain", text.encode()
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"not found\n"
