"""structlog configuration: JSON lines on stdout (console renderer on a TTY), stdlib logs too."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from relay import config


def configure(
    settings: config.LogSettings, *, stream: TextIO | None = None, quiet: bool = False
) -> None:
    """Logs to ``stream`` (stdout by default); ``quiet``: library logs below CRITICAL dropped
    (one-shot commands report what went wrong themselves)."""
    stream = stream or sys.stdout
    level = getattr(logging, settings.level.upper())
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Library logs (aiokafka, aiomysql, asyncio) go through the same renderer.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka is chatty at INFO about every reconnect; its warnings still come through.
    logging.getLogger("aiokafka").setLevel(
        logging.CRITICAL if quiet else max(level, logging.WARNING)
    )
