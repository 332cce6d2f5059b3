"""The daemon's import graph: parsing any command line (``--help`` included), ``relay schema``
and ``relay run`` (``relay.app``) load neither the tools (``relay.tools``) nor their extra
(psutil). Each case runs in a fresh interpreter and reads its ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TOOLS = ("relay.tools", "psutil")

# Runs `setup`, then prints {"loaded": [...], "code": ..., "out": ..., "err": ...} as its last line.
PROBE = """
import contextlib, io, json, sys
out, err, code = io.StringIO(), io.StringIO(), None
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = ({setup})
    except SystemExit as exc:
        code = exc.code
watched = {watched!r}
loaded = sorted(
    m for m, module in sys.modules.items()
    if module is not None and any(m == w or m.startswith(w + ".") for w in watched)
)
print(json.dumps({{"loaded": loaded, "code": code, "out": out.getvalue(), "err": err.getvalue()}}))
"""


def probe(setup: str, watched: tuple[str, ...], prelude: str = "") -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    code = textwrap.dedent(prelude) + PROBE.format(setup=setup, watched=watched)
    proc = subprocess.run(  # noqa: S603 - this interpreter, our own code
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "argv",
    [["run"], ["schema"], ["demo", "--rate", "5"], ["bench", "--mode", "drain", "--json"]],
)
def test_parsing_loads_no_tools(argv: list[str]) -> None:
    result = probe(f"__import__('relay.cli').cli.parser().parse_args({argv!r}) and 0", TOOLS)
    assert result["code"] == 0
    assert result["loaded"] == []


def test_relay_schema_loads_no_tools() -> None:
    result = probe("__import__('relay.cli').cli.main(['schema'])", TOOLS)
    assert result["code"] == 0
    assert "CREATE TABLE" in str(result["out"])
    assert result["loaded"] == []


def test_relay_run_imports_no_tools() -> None:
    """``relay run`` imports ``relay.app`` (and what it imports) and nothing more."""
    result = probe("__import__('relay.app') and 0", TOOLS)
    assert result["code"] == 0
    assert result["loaded"] == []


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        ([], ["run", "schema", "demo", "bench"]),
        (["demo"], ["--rate", "--aggregates", "--writers", "--duration", "--keep"]),
        (["bench"], ["--mode", "--rows", "--retained-published", "--json", "--relay-log"]),
    ],
)
def test_help_lists_the_options_without_loading_the_tools(
    argv: list[str], options: list[str]
) -> None:
    result = probe(f"__import__('relay.cli').cli.main({[*argv, '--help']!r})", TOOLS)
    assert result["code"] == 0
    assert result["loaded"] == []
    for option in options:
        assert option in str(result["out"]), (option, result["out"])


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_tools_without_their_extra_exit_1_with_one_line(command: str) -> None:
    # psutil made unimportable (a None entry in sys.modules), as if the extra were not installed
    result = probe(
        f"__import__('relay.cli').cli.main([{command!r}])",
        TOOLS,
        prelude="import sys\nsys.modules['psutil'] = None\n",
    )
    assert result["code"] == 1
    assert result["err"] == (
        f"relay {command} needs the tools extra: pip install 'outbox-relay[tools]'\n"
    )
    assert result["loaded"] == ["relay.tools"]  # the package alone, none of its modules
