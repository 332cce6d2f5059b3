"""Probe of the local broker's secured listeners for deploy/local/servers.sh.

Produces one record to ``_relay_roundtrip`` (made by roundtrip.py) with an idempotent producer,
``acks=all``, through the listener named: ``ssl`` (TLS, the test CA, the client certificate
``client.pem``) or ``sasl`` (SASL_SSL, SCRAM-SHA-512, the test CA, no client certificate).
Exits 0 on success, 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

TOPIC = "_relay_roundtrip"


class Failed(Exception):
    """The probe failed; the message says why."""


def _context(certs: Path, client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client_cert:
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return context


async def probe(args: argparse.Namespace) -> None:
    options: dict[str, object] = {
        "bootstrap_servers": args.bootstrap,
        "enable_idempotence": True,
        "acks": "all",
        "request_timeout_ms": int(args.timeout * 1000 / 2),
    }
    if args.listener == "ssl":
        options.update(security_protocol="SSL", ssl_context=_context(args.certs, True))
    else:
        options.update(
            security_protocol="SASL_SSL",
            ssl_context=_context(args.certs, False),
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=args.user,
            sasl_plain_password=args.password,
        )
    # aiokafka says why a bootstrap failed only in its log: keep the last reason for the message.
    reasons: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reasons.append(record.getMessage())

    logging.getLogger("aiokafka").addHandler(Keep(logging.WARNING))
    logging.getLogger("aiokafka").propagate = False
    producer = AIOKafkaProducer(**options)
    try:
        await producer.start()
        await producer.send_and_wait(TOPIC, b"secure-probe", key=args.listener.encode())
    except KafkaError as exc:
        raise Failed(f"{exc}{': ' + reasons[-1] if reasons else ''}") from None
    finally:
        await producer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("listener", choices=("ssl", "sasl"))
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--certs", type=Path, required=True, help="directory made by certs.sh")
    parser.add_argument("--user", default="relay")
    parser.add_argument("--password", default="relay")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds in all")
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(args.timeout):
            await probe(args)

    try:
        asyncio.run(bounded())
    except (Failed, KafkaError, OSError, TimeoutError) as exc:
        sys.stderr.write(
            f"{args.listener} listener {args.bootstrap}: {type(exc).__name__}: {exc}\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
