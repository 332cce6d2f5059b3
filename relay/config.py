"""Settings: built once by the CLI from ``RELAY_*`` environment variables and passed down.

Nested groups use ``__`` as delimiter (``RELAY_DB__HOST``). Secrets may also come from files in
``RELAY_SECRETS_DIR`` (default ``/run/secrets/relay``), one file per setting named like the
variable in lower case (``relay_db__password``). Durations are seconds (floats named ``*_s``),
sizes are bytes, counts are plain integers.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
import pydantic_settings

from relay import errors

# MySQL allows 64 characters; the shard table adds "_shard" to the outbox table's name.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,57}$")
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def is_topic_name(name: str) -> bool:
    """Kafka's rule: 1-249 of [A-Za-z0-9._-], and not "." or ".."."""
    return bool(TOPIC_NAME.match(name)) and name not in {".", ".."}


TOPIC_FIELDS = ("aggregate_type", "event_type", "source_table")


def check_topic_template(template: str) -> None:
    """Raise ValueError unless ``template`` has balanced braces, known fields only, and makes a
    valid topic name when every field is a plain word."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); use {{aggregate_type}} etc.") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in TOPIC_FIELDS or spec or conversion:
            raise ValueError(f"unknown placeholder {{{field}}}; allowed: {', '.join(TOPIC_FIELDS)}")
    sample = template.format(**dict.fromkeys(TOPIC_FIELDS, "x"))
    if not is_topic_name(sample):
        raise ValueError(f"does not make a valid Kafka topic name (e.g. {sample!r})")


PositiveFloat = Annotated[float, pydantic.Field(gt=0)]
Port = Annotated[int, pydantic.Field(ge=1, le=65535)]
ListenPort = Annotated[int, pydantic.Field(ge=0, le=65535)]  # 0: any free port


class DatabaseSettings(pydantic.BaseModel):
    """Connection to the MySQL/MariaDB database that holds the outbox table.

    TLS as MySQL clients name it (``--ssl-mode``): ``disabled``; ``preferred`` (the default, as
    for MySQL clients: TLS when the server offers it, else plain; the certificate is not
    checked); ``required`` (TLS or no connection; not checked); ``verify_ca`` (the server's
    certificate must chain to ``ssl_ca``, or to the system's CAs without it); ``verify_identity``
    (and it must name ``host``).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: Port = 3306
    user: str = "relay"
    password: pydantic.SecretStr = pydantic.SecretStr("")
    name: str = "outbox"
    connect_timeout_s: PositiveFloat = 5.0
    call_timeout_s: PositiveFloat = 15.0  # bound of every statement of the daemon's loops
    ssl_mode: Literal["disabled", "preferred", "required", "verify_ca", "verify_identity"] = (
        "preferred"
    )
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = pydantic.Field(default=None, validate_default=True)  # checks the pair

    @pydantic.field_validator("ssl_ca", "ssl_cert", "ssl_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # an empty variable, as templates leave it

    @pydantic.field_validator("ssl_ca")
    @classmethod
    def _ca(cls, value: str | None, info: pydantic.ValidationInfo) -> str | None:
        mode = info.data.get("ssl_mode")
        if value is not None and mode is not None and mode not in ("verify_ca", "verify_identity"):
            raise ValueError(
                f"is only used with RELAY_DB__SSL_MODE=verify_ca or verify_identity (not {mode}:"
                " it would check nothing)"
            )
        return value

    @pydantic.field_validator("ssl_key")
    @classmethod
    def _client_certificate(cls, value: str | None, info: pydantic.ValidationInfo) -> str | None:
        if (value is None) != (info.data.get("ssl_cert") is None):
            raise ValueError("RELAY_DB__SSL_CERT and RELAY_DB__SSL_KEY go together")
        if value is not None and info.data.get("ssl_mode") == "disabled":
            raise ValueError("a client certificate is not used with RELAY_DB__SSL_MODE=disabled")
        return value


class KafkaSettings(pydantic.BaseModel):
    """The Kafka cluster and the idempotent producer's tuning."""

    model_config = pydantic.ConfigDict(extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "outbox-relay"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: pydantic.SecretStr | None = None
    # TLS (security_protocol SSL or SASL_SSL): the system's CAs unless ssl_cafile; a client
    # certificate (mTLS) with ssl_certfile (its key in ssl_keyfile or in the same file).
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: pydantic.SecretStr | None = None
    ssl_check_hostname: bool = True
    # 0: a cycle hands the producer its whole batch at once, so waiting for more only adds
    # latency (benchmarks/README.md, "Results with the final design of issue 11")
    linger_s: Annotated[float, pydantic.Field(ge=0)] = 0.0
    max_batch_bytes: Annotated[int, pydantic.Field(ge=16384)] = 524288
    max_request_bytes: Annotated[int, pydantic.Field(ge=1024)] = 1048576
    # snappy: aiokafka compresses lz4 at level 9 (LZ4-HC), ~7x the CPU of snappy per record,
    # and zstd builds a compression context per batch (costly for the small batches of a cycle)
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "snappy"
    request_timeout_s: PositiveFloat = 10.0
    metadata_max_age_s: PositiveFloat = 60.0

    @pydantic.field_validator(
        "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # an empty variable, as templates leave it

    @pydantic.field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password")
    @classmethod
    def _tls_only(cls, value: object, info: pydantic.ValidationInfo) -> object:
        protocol = info.data.get("security_protocol")
        if value is not None and protocol is not None and protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(
                f"is only used with RELAY_KAFKA__SECURITY_PROTOCOL=SSL or SASL_SSL (not {protocol})"
            )
        needs_certificate = info.field_name in ("ssl_keyfile", "ssl_key_password")
        if value is not None and needs_certificate and not info.data.get("ssl_certfile"):
            raise ValueError("needs RELAY_KAFKA__SSL_CERTFILE (the client certificate)")
        return value


class OutboxSettings(pydantic.BaseModel):
    """The outbox table and how its rows become Kafka records."""

    model_config = pydantic.ConfigDict(extra="forbid")

    table: str = "outbox"
    topic_template: str = "outbox.{aggregate_type}"
    value_format: Literal["envelope", "payload"] = "envelope"
    dead_letter_topic: str | None = None
    on_poison: Literal["hold", "skip"] = "hold"
    record_timestamp: Literal["send_time", "event_time"] = "send_time"

    @pydantic.field_validator("table")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not TABLE_NAME.match(value):
            raise ValueError("must be a plain SQL identifier: letters, digits, _ (max 58)")
        return value

    @pydantic.field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        check_topic_template(value)
        return value

    @pydantic.field_validator("dead_letter_topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        if value is not None and not is_topic_name(value):
            raise ValueError("not a valid Kafka topic name")
        return value


class WorkerSettings(pydantic.BaseModel):
    """Claim-publish-mark workers of one process."""

    model_config = pydantic.ConfigDict(extra="forbid")

    count: Annotated[int, pydantic.Field(ge=1, le=64)] = 2
    batch_size: Annotated[int, pydantic.Field(ge=1, le=10000)] = 1000
    batch_max_bytes: Annotated[int, pydantic.Field(ge=1024)] = 16 * 1024 * 1024
    shards_per_claim: Annotated[int, pydantic.Field(ge=1, le=64)] = 16
    poll_interval_s: PositiveFloat = 0.1
    poll_min_interval_s: PositiveFloat = 0.005
    claim_linger_s: Annotated[float, pydantic.Field(ge=0)] = 0.002
    publish_timeout_s: PositiveFloat = 15.0
    backoff_initial_s: PositiveFloat = 0.1
    backoff_max_s: PositiveFloat = 5.0
    hold_retry_initial_s: PositiveFloat = 1.0
    hold_retry_max_s: PositiveFloat = 60.0
    unready_after_failed_cycles: Annotated[int, pydantic.Field(ge=1)] = 5
    lock_wait_timeout_s: Annotated[float, pydantic.Field(ge=1)] = 5.0
    shutdown_timeout_s: PositiveFloat = 20.0


class CleanerSettings(pydantic.BaseModel):
    """Deletes published rows after the retention period; one cleaner at a time cluster-wide."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    retention_s: Annotated[float, pydantic.Field(ge=0)] = 86400.0
    interval_s: PositiveFloat = 60.0
    chunk_size: Annotated[int, pydantic.Field(ge=1, le=100000)] = 1000
    max_chunks_per_run: Annotated[int, pydantic.Field(ge=1)] = 1000


class HttpSettings(pydantic.BaseModel):
    """The metrics and health endpoint: /metrics, /livez, /readyz."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - a daemon's probe port listens on the pod IP
    port: ListenPort = 9108
    liveness_stale_s: PositiveFloat = 30.0
    max_connections: Annotated[int, pydantic.Field(ge=1)] = 16
    request_timeout_s: PositiveFloat = 5.0
    # Old names of RELAY_BACKLOG__SAMPLE_INTERVAL_S and RELAY_BACKLOG__COUNT_CAP, still honoured.
    backlog_sample_interval_s: PositiveFloat | None = None
    backlog_count_cap: Annotated[int, pydantic.Field(ge=1)] | None = None


class BacklogSettings(pydantic.BaseModel):
    """The backlog sampler behind the backlog and held-aggregate gauges."""

    model_config = pydantic.ConfigDict(extra="forbid")

    sample_interval_s: PositiveFloat = 5.0
    count_cap: Annotated[int, pydantic.Field(ge=1)] = 100000


class WakeupSettings(pydantic.BaseModel):
    """Optional wake-ups right after a commit: a UDP port on which writers nudge the relay
    (``enabled``), and/or the server's binary log followed like a replica (``binlog``)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = False
    binlog: bool = False
    host: str = "127.0.0.1"  # a sidecar's writers; "0.0.0.0" for writers in other pods
    port: ListenPort = 9109
    min_interval_s: Annotated[float, pydantic.Field(ge=0)] = 0.01


class LogSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(pydantic_settings.BaseSettings):
    """All settings of the relay daemon."""

    model_config = pydantic_settings.SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        secrets_nested_delimiter="__",
        secrets_dir_missing="ok",
        extra="forbid",
        case_sensitive=False,
    )

    db: DatabaseSettings = DatabaseSettings()
    kafka: KafkaSettings = KafkaSettings()
    outbox: OutboxSettings = OutboxSettings()
    worker: WorkerSettings = WorkerSettings()
    cleaner: CleanerSettings = CleanerSettings()
    http: HttpSettings = HttpSettings()
    backlog: BacklogSettings = BacklogSettings()
    wakeup: WakeupSettings = WakeupSettings()
    log: LogSettings = LogSettings()

    @pydantic.model_validator(mode="after")
    def _backlog_aliases(self) -> Settings:
        """The old RELAY_HTTP__BACKLOG_* names apply unless the new names are set."""
        old = {
            "sample_interval_s": self.http.backlog_sample_interval_s,
            "count_cap": self.http.backlog_count_cap,
        }
        given = {k: v for k, v in old.items() if v is not None}
        given = {k: v for k, v in given.items() if k not in self.backlog.model_fields_set}
        if given:
            self.backlog = self.backlog.model_copy(update=given)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        # Explicit overrides, then the environment, then secret files (relay_db__password).
        secrets = pydantic_settings.NestedSecretsSettingsSource(file_secret_settings)
        return init_settings, env_settings, secrets


ConfigError = errors.ConfigError

# Variables of the relay's own that are not settings.
NOT_SETTINGS = frozenset({"RELAY_SECRETS_DIR"})


def check_names(environ: Mapping[str, str]) -> None:
    """Refuse unknown ``RELAY_<GROUP>__<NAME>`` variables.

    Variables without ``__`` (``RELAY_PORT`` from a Kubernetes service link, say) are left
    alone: they cannot be meant as settings.
    """
    groups = Settings.model_fields
    unknown: list[str] = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith("RELAY_") or "__" not in upper or upper in NOT_SETTINGS:
            continue
        group, _, field = upper.removeprefix("RELAY_").lower().partition("__")
        model = groups[group].annotation if group in groups else None
        if model is None or field not in model.model_fields:  # type: ignore[union-attr]
            unknown.append(upper)
    if unknown:
        raise ConfigError(
            f"invalid configuration: unknown setting(s) {', '.join(sorted(unknown))}"
            " (see the settings table in README.md)"
        )


def load(**overrides: Any) -> Settings:
    """Build the settings from the environment (and secret files), with optional overrides."""
    secrets_dir = os.environ.get("RELAY_SECRETS_DIR", "/run/secrets/relay")
    try:
        check_names(os.environ)
        return Settings(_secrets_dir=secrets_dir, **overrides)  # type: ignore[call-arg]
    except pydantic.ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    except pydantic_settings.SettingsError as exc:
        # a whole group given as JSON that does not parse; the message names the field only
        match = re.search(r'field "([^"]+)"', str(exc))
        name = match.group(1).upper() if match else "?"
        raise ConfigError(f"invalid configuration: RELAY_{name}: not valid JSON") from None


def describe(exc: pydantic.ValidationError) -> str:
    """One line naming each bad setting by its env var; input values are left out on purpose."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        path = "__".join(str(p) for p in error["loc"])
        parts.append(f"RELAY_{path.upper()}: {error['msg']}")
    return "invalid configuration: " + "; ".join(parts)
