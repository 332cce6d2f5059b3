"""Network faults through toxiproxy (deploy/local/toxiproxy.sh), driven over its HTTP API.

A :class:`Proxy` forwards ``listen`` to ``upstream``; toxics change what goes through it until
they are removed. Everything is an async context manager, so a fault ends with its block::

    api = proxies.Toxiproxy(proxies.api_port())
    async with api.proxy("mariadb", upstream="127.0.0.1:3307") as db_proxy:
        ...  # point the relay at db_proxy.listen
        async with db_proxy.black_hole():  # nothing passes, connections stay open
            ...
        async with db_proxy.toxic("latency", latency=500):
            ...

Toxics (toxiproxy v2.5): ``latency`` (``latency``, ``jitter`` ms), ``bandwidth`` (``rate``
KB/s), ``reset_peer`` (``timeout`` ms, then a TCP RST; 0: at once, every connection, new ones
too), ``timeout`` (``timeout`` ms, then close; 0: data dropped until removed: a black hole),
``slow_close`` (``delay`` ms before the close is passed on), ``limit_data`` (``bytes``).
``stream`` is ``downstream`` (server to client) or ``upstream`` (client to server).
A :class:`ProxyGroup` applies a toxic to several proxies at once (the brokers of a cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from servers import REPO_ROOT, unique_name

from relay.tools import net

TOXIPROXY_SH = REPO_ROOT / "deploy" / "local" / "toxiproxy.sh"
DEFAULT_PORT = 18474
STREAMS = ("upstream", "downstream")


def api_port() -> int:
    return int(os.environ.get("OUTBOX_TOXIPROXY_PORT", str(DEFAULT_PORT)))


def toxiproxy_sh(
    action: str, *, env: Mapping[str, str] | None = None, timeout_s: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """``deploy/local/toxiproxy.sh <action>`` (build, up, down, status) with ``env`` added to
    the environment (``OUTBOX_LOCAL_DIR``, ``OUTBOX_TOXIPROXY_PORT``); not checked."""
    return subprocess.run(  # noqa: S603 - fixed argv, our own script
        ["bash", str(TOXIPROXY_SH), action],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ | dict(env or {}),
        check=False,
    )


class ToxiproxyError(RuntimeError):
    """The API answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"toxiproxy {method} {path}: HTTP {status}: {body.strip()[:300]}")
        self.status = status


@dataclasses.dataclass(frozen=True)
class Toxiproxy:
    """The API of a running toxiproxy server on 127.0.0.1:``port``."""

    port: int = DEFAULT_PORT
    timeout_s: float = 10.0

    async def request(self, method: str, path: str, body: object = None) -> Any:
        """One HTTP/1.1 request (connection closed after it); the decoded JSON answer."""
        text = await self.send(method, path, body)
        return json.loads(text) if text.strip() else None

    async def send(self, method: str, path: str, body: object = None) -> str:
        """One HTTP/1.1 request (connection closed after it); the answer's body."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        )
        data = await net.exchange(self.port, head.encode() + payload, self.timeout_s)
        status_line, _, rest = data.partition(b"\r\n")
        headers, _, text = rest.partition(b"\r\n\r\n")
        status = int(status_line.split(b" ", 2)[1]) if status_line.startswith(b"HTTP/") else 0
        if b"transfer-encoding: chunked" in headers.lower():
            text = _dechunk(text)
        if not 200 <= status < 300:
            raise ToxiproxyError(method, path, status, text.decode(errors="replace"))
        return text.decode(errors="replace")

    async def version(self) -> str:
        return (await self.send("GET", "/version")).strip()

    async def proxies(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = await self.request("GET", "/proxies")
        return result

    async def create(self, name: str, upstream: str, listen: str = "127.0.0.1:0") -> Proxy:
        """A new enabled proxy. A leftover proxy of the same name or on the same listen address
        (from a test that died) is deleted first. ``listen`` port 0: any free port."""
        for other in (await self.proxies()).values():
            if other["name"] == name or (not listen.endswith(":0") and other["listen"] == listen):
                await self.delete(str(other["name"]))
        created = await self.request(
            "POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream}
        )
        return Proxy(self, name, str(created["listen"]), upstream)

    async def delete(self, name: str) -> None:
        with contextlib.suppress(ToxiproxyError):  # already gone
            await self.request("DELETE", f"/proxies/{name}")

    @contextlib.asynccontextmanager
    async def proxy(
        self, prefix: str, upstream: str, listen: str = "127.0.0.1:0"
    ) -> AsyncIterator[Proxy]:
        """A proxy named ``<prefix>_<hex>`` for the block; deleted afterwards (its connections
        are closed)."""
        proxy = await self.create(unique_name(f"{prefix}_"), upstream, listen)
        try:
            yield proxy
        finally:
            await self.delete(proxy.name)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class Proxy:
    api: Toxiproxy
    name: str
    listen: str  # host:port clients connect to
    upstream: str

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    async def add_toxic(
        self,
        kind: str,
        *,
        stream: str = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
        attributes: Mapping[str, int] | None = None,
    ) -> str:
        """Add a toxic now (it applies to open connections too); returns its name."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}")
        toxic = name or unique_name(f"{kind}_{stream}_")
        await self.api.request(
            "POST",
            f"/proxies/{self.name}/toxics",
            {
                "name": toxic,
                "type": kind,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": dict(attributes or {}),
            },
        )
        return toxic

    async def remove_toxic(self, toxic: str) -> None:
        await self.api.request("DELETE", f"/proxies/{self.name}/toxics/{toxic}")

    async def toxics(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.api.request("GET", f"/proxies/{self.name}/toxics")
        return result

    async def set_enabled(self, enabled: bool) -> None:
        """Disabled: the listener closes and every connection is cut (no RST, a close);
        nothing connects until enabled again."""
        await self.api.request("POST", f"/proxies/{self.name}", {"enabled": enabled})

    @contextlib.asynccontextmanager
    async def toxic(
        self, kind: str, *, streams: Iterable[str] = ("downstream",), **attributes: int
    ) -> AsyncIterator[None]:
        """A toxic on each of ``streams`` for the block."""
        added: list[str] = []
        try:
            for stream in streams:
                toxic = await self.add_toxic(kind, stream=stream, attributes=attributes)
                added.append(toxic)  # each one is removed even if the next one fails
            yield
        finally:
            for toxic in added:
                await self.remove_toxic(toxic)

    def black_hole(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Nothing passes either way and no connection is closed (a ``timeout`` toxic of 0 on
        both streams): a partition, or a peer gone silent. Data sent meanwhile is lost."""
        return self.toxic("timeout", streams=STREAMS, timeout=0)

    def latency(self, ms: int, jitter_ms: int = 0) -> contextlib.AbstractAsyncContextManager[None]:
        """Every answer comes ``ms`` later (on the downstream): a round trip takes ``ms`` more."""
        return self.toxic("latency", latency=ms, jitter=jitter_ms)

    def bandwidth(self, kb_per_s: int) -> contextlib.AbstractAsyncContextManager[None]:
        return self.toxic("bandwidth", streams=STREAMS, rate=kb_per_s)

    def slow_close(self, delay_ms: int) -> contextlib.AbstractAsyncContextManager[None]:
        return self.toxic("slow_close", streams=STREAMS, delay=delay_ms)

    def resetting(self, after_ms: int = 0) -> contextlib.AbstractAsyncContextManager[None]:
        """Every connection, open or new, is reset (RST) ``after_ms`` after the toxic meets it."""
        return self.toxic("reset_peer", streams=("upstream",), timeout=after_ms)

    async def cut(self) -> None:
        """Cut every connection at once, with whatever a toxic still holds for them, and take
        new ones again on the same address, without toxics: the proxy is deleted and made
        again. (Disabling the proxy cuts too, but then removing a latency toxic that held data
        of a cut connection can hang toxiproxy's API: Shopify/toxiproxy#558.)"""
        await self.api.delete(self.name)
        await self.api.create(self.name, self.upstream, self.listen)

    @contextlib.asynccontextmanager
    async def disabled(self) -> AsyncIterator[None]:
        await self.set_enabled(False)
        try:
            yield
        finally:
            await self.set_enabled(True)


@dataclasses.dataclass(frozen=True)
class ProxyGroup:
    """Several proxies faulted together (the three brokers of the cluster, say)."""

    members: tuple[Proxy, ...]

    @property
    def listen(self) -> str:
        """A comma-separated address list (a Kafka bootstrap list)."""
        return ",".join(p.listen for p in self.members)

    @contextlib.asynccontextmanager
    async def each(self, fault: str, *args: int, **kwargs: int) -> AsyncIterator[None]:
        """``Proxy.<fault>(*args, **kwargs)`` on every member for the block."""
        async with contextlib.AsyncExitStack() as stack:
            for proxy in self.members:
                await stack.enter_async_context(getattr(proxy, fault)(*args, **kwargs))
            yield

    def black_hole(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.each("black_hole")

    def latency(self, ms: int, jitter_ms: int = 0) -> contextlib.AbstractAsyncContextManager[None]:
        return self.each("latency", ms, jitter_ms)

    def bandwidth(self, kb_per_s: int) -> contextlib.AbstractAsyncContextManager[None]:
        return self.each("bandwidth", kb_per_s)

    def slow_close(self, delay_ms: int) -> contextlib.AbstractAsyncContextManager[None]:
        return self.each("slow_close", delay_ms)

    def resetting(self, after_ms: int = 0) -> contextlib.AbstractAsyncContextManager[None]:
        return self.each("resetting", after_ms)


@contextlib.asynccontextmanager
async def group(
    api: Toxiproxy, prefix: str, routes: Iterable[tuple[str, str]]
) -> AsyncIterator[ProxyGroup]:
    """Proxies ``<prefix><i>_<hex>`` for ``(listen, upstream)`` pairs, deleted afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        members = [
            await stack.enter_async_context(api.proxy(f"{prefix}{i}", upstream, listen))
            for i, (listen, upstream) in enumerate(routes, 1)
        ]
        yield ProxyGroup(tuple(members))
