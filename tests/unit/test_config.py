"""Settings: RELAY_* variables, secret files, one-line errors that never leak a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-do-not-print"  # noqa: S105 - a marker to look for in error messages


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No RELAY_* variable from the outside; an empty secrets directory of our own."""
    for name in list(os.environ):
        if name.upper().startswith("RELAY_"):
            monkeypatch.delenv(name)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    monkeypatch.setenv("RELAY_SECRETS_DIR", str(secrets))
    return secrets


def test_defaults() -> None:
    settings = config.load()
    assert settings.db.port == 3306
    assert settings.outbox.table == "outbox"
    assert settings.worker.count == 2
    assert settings.db.password.get_secret_value() == ""


def test_env_vars_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_DB__HOST", "db.example")
    monkeypatch.setenv("RELAY_DB__PORT", "3310")
    monkeypatch.setenv("RELAY_WORKER__COUNT", "7")
    monkeypatch.setenv("RELAY_WORKER__PUBLISH_TIMEOUT_S", "2.5")
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("RELAY_OUTBOX__TOPIC_TEMPLATE", "events.{aggregate_type}.{event_type}")
    monkeypatch.setenv("RELAY_CLEANER__ENABLED", "false")
    monkeypatch.setenv("relay_log__level", "debug")  # case-insensitive
    settings = config.load()
    assert settings.db.host == "db.example"
    assert settings.db.port == 3310
    assert settings.worker.count == 7
    assert settings.worker.publish_timeout_s == 2.5
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.outbox.topic_template == "events.{aggregate_type}.{event_type}"
    assert settings.cleaner.enabled is False
    assert settings.log.level == "debug"
    # untouched siblings keep their defaults
    assert settings.db.user == "relay"
    assert settings.worker.batch_size == 1000


def test_env_var_without_prefix_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB__HOST", "elsewhere")
    assert config.load().db.host == "127.0.0.1"


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_DB__HOST", "from-env")
    monkeypatch.setenv("RELAY_DB__USER", "env-user")
    settings = config.load(db={"host": "from-override"})
    assert settings.db.host == "from-override"


def test_secret_file(clean_env: Path) -> None:
    (clean_env / "relay_db__password").write_text(SECRET + "\n")
    (clean_env / "relay_kafka__sasl_password").write_text("kafka-secret")
    settings = config.load()
    assert settings.db.password.get_secret_value() == SECRET
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "kafka-secret"
    # never shown by repr or str
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.db)


def test_env_var_wins_over_secret_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "relay_db__password").write_text("from-file")
    monkeypatch.setenv("RELAY_DB__PASSWORD", "from-env")
    assert config.load().db.password.get_secret_value() == "from-env"


def test_missing_secrets_dir_is_fine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RELAY_SECRETS_DIR", str(tmp_path / "does-not-exist"))
    assert config.load().db.password.get_secret_value() == ""


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError) as raised:
        config.load()
    return str(raised.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_WORKER__COUNT", "0"),
        ("RELAY_WORKER__COUNT", "lots"),
        ("RELAY_DB__PORT", "70000"),
        ("RELAY_KAFKA__COMPRESSION", "brotli"),
        ("RELAY_OUTBOX__TABLE", "x`; DROP TABLE users; --"),
        ("RELAY_OUTBOX__TOPIC_TEMPLATE", "outbox.{tenant}"),
        ("RELAY_OUTBOX__DEAD_LETTER_TOPIC", "not a topic"),
        ("RELAY_WORKER__NO_SUCH_SETTING", "1"),
    ],
)
def test_invalid_setting_names_env_var_in_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    message = _error(monkeypatch, **{name: value})
    assert message.startswith("invalid configuration: ")
    assert "\n" not in message
    assert name in message


def test_invalid_nested_group_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole group given as (broken) JSON is still one line naming the variable, no traceback."""
    message = _error(monkeypatch, RELAY_DB='{"password": "' + SECRET + '", ')
    assert "\n" not in message
    assert "RELAY_DB" in message
    assert SECRET not in message


def test_error_never_contains_secret_values(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    (clean_env / "relay_kafka__sasl_password").write_text(SECRET)
    message = _error(
        monkeypatch,
        RELAY_DB__PASSWORD=SECRET,
        RELAY_DB__PORT=SECRET,  # a secret pasted into the wrong variable
        RELAY_KAFKA__SECURITY_PROTOCOL=SECRET,
        RELAY_WORKER__COUNT="0",
    )
    assert "RELAY_DB__PORT" in message
    assert "RELAY_KAFKA__SECURITY_PROTOCOL" in message
    assert "RELAY_WORKER__COUNT" in message
    assert SECRET not in message
    assert "\n" not in message


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELAY_")}
    return subprocess.run(  # noqa: S603 - our own CLI with fixed arguments
        [sys.executable, "-m", "relay", *args],
        env={**base, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["schema", "migrate", "run"])
def test_cli_bad_setting_exits_78_with_one_stderr_line(clean_env: Path, command: str) -> None:
    (clean_env / "relay_db__password").write_text(SECRET)
    proc = _cli(
        [command],
        {
            "RELAY_SECRETS_DIR": str(clean_env),
            "RELAY_WORKER__COUNT": "0",
            "RELAY_KAFKA__SASL_PASSWORD": SECRET,
        },
    )
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("relay: invalid configuration: ")
    assert "RELAY_WORKER__COUNT" in lines[0]
    assert SECRET not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_cli_broken_group_json_exits_78(clean_env: Path) -> None:
    proc = _cli(["schema"], {"RELAY_SECRETS_DIR": str(clean_env), "RELAY_DB": "{"})
    assert proc.returncode == 78, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "RELAY_DB" in proc.stderr


def test_cli_schema_with_valid_settings_exits_0(clean_env: Path) -> None:
    proc = _cli(["schema"], {"RELAY_SECRETS_DIR": str(clean_env), "RELAY_OUTBOX__TABLE": "events"})
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE IF NOT EXISTS `events`" in proc.stdout
    assert "CREATE TABLE IF NOT EXISTS `events_shard`" in proc.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_WORKERS__COUNT", "2"),  # a typo in the group
        ("RELAY_WORKER__COUNTS", "2"),  # a typo in the name
        ("relay_nope__x", "1"),  # an unknown group, any case
    ],
)
def test_unknown_setting_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError, match=name.upper()):
        config.load()


def test_variables_without_a_group_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes service links for a Service named "relay" inject RELAY_PORT and friends."""
    monkeypatch.setenv("RELAY_PORT", "tcp://10.0.0.1:9108")
    monkeypatch.setenv("RELAY_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("RELAY_PORT_9108_TCP_ADDR", "10.0.0.1")
    assert config.load().http.port == 9108


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("x.{aggregate_type}}", "Single '}'"),
        ("x.{aggregate_type", "expected '}'"),
        ("x.{nope}", "unknown placeholder {nope}"),
        ("x.{aggregate_type!r}", "unknown placeholder"),
        ("a topic.{aggregate_type}", "valid Kafka topic name"),
    ],
)
def test_bad_topic_template_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, template: str, why: str
) -> None:
    monkeypatch.setenv("RELAY_OUTBOX__TOPIC_TEMPLATE", template)
    with pytest.raises(config.ConfigError, match="RELAY_OUTBOX__TOPIC_TEMPLATE") as raised:
        config.load()
    assert why in str(raised.value)


def test_old_backlog_names_still_work_and_new_ones_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_HTTP__BACKLOG_SAMPLE_INTERVAL_S", "7")
    monkeypatch.setenv("RELAY_HTTP__BACKLOG_COUNT_CAP", "10")
    monkeypatch.setenv("RELAY_BACKLOG__COUNT_CAP", "20")
    settings = config.load()
    assert settings.backlog.sample_interval_s == 7.0
    assert settings.backlog.count_cap == 20


@pytest.mark.parametrize("command", ["run", "check", "migrate"])
def test_cli_unknown_setting_exits_78(clean_env: Path, command: str) -> None:
    proc = _cli([command], {"RELAY_SECRETS_DIR": str(clean_env), "RELAY_WORKERS__COUNT": "2"})
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.splitlines() == [
        "relay: invalid configuration: unknown setting(s) RELAY_WORKERS__COUNT"
        " (see the settings table in README.md)"
    ]


@pytest.mark.parametrize("command", ["migrate", "replay", "failed", "check"])
def test_cli_unreachable_database_is_one_line_and_exit_3(clean_env: Path, command: str) -> None:
    env = {
        "RELAY_SECRETS_DIR": str(clean_env),
        "RELAY_DB__PORT": "1",
        "RELAY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "RELAY_KAFKA__REQUEST_TIMEOUT_S": "1",
    }
    proc = _cli([command], env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    if command == "check":  # its findings are its output, one line each, nothing else
        assert proc.stdout.splitlines()[0].startswith("FAIL database: cannot connect")
        assert all(ln.startswith(("ok  ", "FAIL")) for ln in proc.stdout.splitlines())
    else:
        assert proc.stderr.splitlines() == [
            f"relay {command}: OperationalError: (2003, \"Can't connect to MySQL server on"
            " '127.0.0.1'\")"
        ]
