"""`relay check`'s reading of GRANT statements: what goes beyond the relay's needs."""

from __future__ import annotations

from relay import preflight


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
