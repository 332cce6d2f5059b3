"""outbox-relay: moves committed MySQL/MariaDB outbox rows to Kafka."""

from __future__ import annotations

__version__ = "0.1.0"
