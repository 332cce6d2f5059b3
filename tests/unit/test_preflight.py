"""`relay check`'s reading of GRANT statements (what goes beyond the relay's needs) and of a
certificate file that cannot be loaded."""

from __future__ import annotations

from pathlib import Path

from relay import config, errors, preflight


def test_all_privileges_and_grant_option_are_excess() -> None:
    grants = [
        "GRANT ALL PRIVILEGES ON *.* TO `relay`@`%` IDENTIFIED BY PASSWORD <hidden>"
        " WITH GRANT OPTION"
    ]
    assert preflight.excess_privileges(grants) == [
        "ALL PRIVILEGES ON *.*",
        "GRANT OPTION ON *.*",
    ]


def test_least_privilege_grants_are_not_excess() -> None:
    grants = [
        "GRANT USAGE ON *.* TO `relay`@`%`",
        "GRANT SELECT, UPDATE, DELETE ON `app`.`outbox` TO `relay`@`%`",
        "GRANT SELECT, UPDATE ON `app`.`outbox_shard` TO `relay`@`%`",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `app`.`outbox_hold` TO `relay`@`%`",
        "GRANT SELECT ON `app`.`outbox_meta` TO `relay`@`%`",
    ]
    assert preflight.excess_privileges(grants) == []


def test_super_among_others_is_found() -> None:
    grants = ["GRANT SELECT, SUPER, PROCESS ON *.* TO `relay`@`%`"]
    assert preflight.excess_privileges(grants) == ["SUPER ON *.*", "PROCESS ON *.*"]


async def test_kafka_certificate_file_that_cannot_be_loaded_is_a_setting_error(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    settings = config.Settings(
        kafka=config.KafkaSettings(
            bootstrap_servers="127.0.0.1:9", security_protocol="SSL", ssl_cafile=str(bad)
        )
    )
    (result,) = await preflight._kafka(settings, [])
    assert not result.ok
    assert result.detail.startswith("invalid configuration: RELAY_KAFKA__SSL_CAFILE")
    assert result.exit_code == errors.ExitCode.CONFIG  # 78, not "unavailable" (3)
