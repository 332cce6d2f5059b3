"""Wake-up datagrams: bound to loopback by default, a flood coalesced into few wake-ups."""

from __future__ import annotations

import asyncio
import socket

from relay import config, pacing, wakeup


class CountingWaker(pacing.Waker):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.fired = asyncio.Event()

    def notify(self) -> None:
        self.count += 1
        self.fired.set()


def test_listens_on_loopback_by_default() -> None:
    assert config.WakeupSettings().host == "127.0.0.1"


async def test_a_flood_is_coalesced_into_one_wake_up_per_interval() -> None:
    waker = CountingWaker()
    listener = wakeup.Listener(
        config.WakeupSettings(enabled=True, port=0, min_interval_s=0.2), waker
    )
    await listener.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(200):
            sender.sendto(wakeup.PAYLOAD, ("127.0.0.1", listener.port))
        async with asyncio.timeout(5):
            await waker.fired.wait()  # the first datagram wakes a worker at once
            waker.fired.clear()
            await waker.fired.wait()  # the rest of the burst: one more, at the interval's end
        assert waker.count == 2
    finally:
        sender.close()
        listener.stop()
