"""Sub-poll latency: writers nudge relays with a UDP datagram right after they commit.

Polling stays the source of truth; a lost datagram only costs up to one poll interval.
The datagram carries no data the relay trusts: any datagram on the port wakes one worker, at
most once per ``min_interval_s`` (a burst or a flood is coalesced into one wake-up at the end
of the interval). The listener binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable

from relay import config, metrics, pacing

PAYLOAD = b"outbox"


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, waker: pacing.Waker, min_interval_s: float) -> None:
        self._nudges = pacing.Nudges(waker, min_interval_s)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        metrics.wakeups.inc()
        self._nudges.nudge()

    def connection_lost(self, exc: Exception | None) -> None:
        self._nudges.close()


class Listener:
    def __init__(self, settings: config.WakeupSettings, waker: pacing.Waker) -> None:
        self._settings = settings
        self._waker = waker
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        if self._transport is None:
            raise RuntimeError("wake-up listener not started")
        port: int = self._transport.get_extra_info("sockname")[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._waker, self._settings.min_interval_s),
            local_addr=(self._settings.host, self._settings.port),
        )

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Notifier:
    """Used by writers after commit: fire-and-forget datagrams to every relay address."""

    def __init__(self, addresses: Iterable[tuple[str, int]]) -> None:
        self._addresses = list(addresses)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    @classmethod
    def parse(cls, spec: str) -> Notifier:
        """From ``"host:port,host:port"``."""
        addresses = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            host, _, port = item.rpartition(":")
            addresses.append((host or "127.0.0.1", int(port)))
        return cls(addresses)

    def notify(self) -> None:
        for address in self._addresses:
            with contextlib.suppress(OSError):  # best effort: polling finds the rows anyway
                self._socket.sendto(PAYLOAD, address)

    def close(self) -> None:
        self._socket.close()
