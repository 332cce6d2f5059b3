"""The image's virtualenv, built outside Docker the way the Dockerfile's build stage builds it.

No base image can be pulled here, so the Dockerfile is replayed instead: the build stage's ENV,
WORKDIR, COPY (of what .dockerignore lets into the build context) and RUN instructions run in
order, with /opt/relay moved into a temporary directory and `python` being a Python of the base
image's version that has pip. What the RUN lines do is theirs, unchanged: the locked wheels with
`--require-hashes --only-binary=:all:`, the relay offline with `--no-deps --no-build-isolation`,
setuptools removed, `pip check`. The one difference is where pip finds the locked wheels: a
directory (PIP_NO_INDEX, PIP_FIND_LINKS) that `pip download` fills from the index once per lock
file and Python, in ~/.cache/outbox-relay/image-wheels/ (pip still checks every file against the
lock's hashes). The final stage removes pip, setuptools and wheel from the base image's Python,
which the virtualenv does not see; here the virtualenv itself must have none of them. Then the
relay runs with the final stage's ENV: `relay --version`, and `relay check` against servers that
are not there (exit 3, FAIL lines, no traceback) and against the local ones (exit 4 on an empty
database; 0 after `relay migrate`, which needs the SQL files of the installed package).

A build that cannot run (no Python of the image's version, no index on a cold cache) fails the
tests; it never skips them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import servers
from packaging.markers import Marker

import relay

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "requirements.lock"
IMAGE_VENV = "/opt/relay"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outbox-relay"
WHEELS = CACHE / "image-wheels"
WHEELS_KEPT_DAYS = 30
# PATH and LANG of the python:3.11-slim images, before the final stage's ENV.
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# What the final stage's RUN removes from the base image's Python: none of it in the venv either.
INSTALLERS = ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack")


# --- the Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """Instructions one per line: continuations joined, comment lines dropped (as BuildKit)."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    assert not current.strip(), "the Dockerfile ends inside a continued line"
    return lines


def _stages() -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages of the Dockerfile."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(DOCKERFILE.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            stages.append(Stage(rest))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            pytest.fail(f"Dockerfile: {keyword} before the first FROM", pytrace=False)
    assert len(stages) >= 2, "the Dockerfile has a build stage and a final stage"
    return args, stages


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def _apply_env(rest: str, env: dict[str, str], venv: Path) -> None:
    """ENV K=V K2=V2 (values may name earlier variables), with /opt/relay moved to ``venv``."""
    for item in shlex.split(rest):
        name, sep, value = item.partition("=")
        assert sep, f"ENV {rest}: only the K=V form is replayed"
        env[name] = _expand(value, env).replace(IMAGE_VENV, str(venv))


# --- the build context (.dockerignore) --------------------------------------------------------


def _ignore_patterns() -> list[tuple[bool, str]]:
    """(exclude?, pattern) in order; the last pattern that matches a path decides."""
    patterns: list[tuple[bool, str]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        patterns.append((not negated, pattern))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    options = [pattern]
    if pattern.startswith("**/"):
        options.append(pattern[3:])  # ** also matches no directory at all
    return any(
        fnmatch.fnmatchcase(candidate, option) for candidate in candidates for option in options
    )


def _in_context(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    included = True
    for exclude, pattern in patterns:
        if _pattern_matches(pattern, relative):
            included = not exclude
    return included


def _copy(rest: str, workdir: Path) -> None:
    """COPY src... dest from the build context into ``workdir`` (no flags: none are used)."""
    words = shlex.split(rest)
    assert not words[0].startswith("--"), f"COPY {rest}: flags are not replayed"
    *sources, dest = words
    target = workdir / dest
    patterns = _ignore_patterns()
    for source in sources:
        assert _in_context(source, patterns), f"COPY {source}: excluded by .dockerignore"
        origin = ROOT / source
        if origin.is_dir():
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and _in_context(relative, patterns):
                    out = target / path.relative_to(origin)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)
        elif dest.endswith("/") or len(sources) > 1:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / origin.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


# --- the Python and the locked wheels ----------------------------------------------------------


def _run(
    argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed argv: our Python, pip, the built relay
        argv, capture_output=True, text=True, check=False, env=env, cwd=cwd, timeout=timeout
    )


def _image_python(args: dict[str, str]) -> str:
    """A Python of the base image's version (python:X.Y-...) that has pip."""
    match = re.match(r"python:(\d+\.\d+)", args.get("PYTHON_IMAGE", ""))
    assert match, f"ARG PYTHON_IMAGE={args.get('PYTHON_IMAGE')!r}: not a python:X.Y image"
    minor = match.group(1)
    candidates = [sys.executable] if f"{sys.version_info[0]}.{sys.version_info[1]}" == minor else []
    candidates += [found for found in [shutil.which(f"python{minor}")] if found]
    for candidate in candidates:
        if _run([candidate, "-m", "pip", "--version"], timeout=60).returncode == 0:
            return candidate
    pytest.fail(
        f"no Python {minor} with pip to replay the image build (the base image is"
        f" {args['PYTHON_IMAGE']}); tried {candidates or [f'python{minor}']}",
        pytrace=False,
    )


def _download_env() -> dict[str, str]:
    """This environment without pip settings that would bypass or disable the index."""
    dropped = {"PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV", "PIP_TARGET"}
    return {key: value for key, value in os.environ.items() if key not in dropped}


def _locked_wheels(python: str) -> Path:
    """The lock's wheels for ``python``, downloaded (hash-checked) once per lock and Python."""
    probe = "import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())"
    proc = _run([python, "-c", probe], timeout=60)
    assert proc.returncode == 0, proc.stderr
    key = hashlib.sha256(LOCK.read_bytes() + proc.stdout.encode()).hexdigest()[:16]
    target = WHEELS / key
    if (target / ".complete").is_file():
        return target
    WHEELS.mkdir(parents=True, exist_ok=True)
    _prune_wheels(keep=key)
    partial = WHEELS / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    download = [python, "-m", "pip", "download", "--disable-pip-version-check", "--quiet"]
    download += ["--require-hashes", "--only-binary=:all:", "-r", str(LOCK), "-d", str(partial)]
    proc = _run(download, env=_download_env(), timeout=600)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.fail(
            f"pip download of {LOCK.name}'s wheels failed (the index is needed once per lock"
            f" file, then {WHEELS} serves them):\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    (partial / ".complete").write_text(proc.stdout)
    try:
        partial.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _prune_wheels(keep: str) -> None:
    """Wheel directories of older lock files, unused for WHEELS_KEPT_DAYS."""
    cutoff = time.time() - WHEELS_KEPT_DAYS * 86400
    for path in WHEELS.iterdir():
        if path.name != keep and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)


# --- the replay ------------------------------------------------------------------------------


@dataclass
class Image:
    venv: Path
    env: dict[str, str]  # the final stage's environment, /opt/relay moved to ``venv``
    stages: list[Stage]
    log: list[str]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: int = 120
    ) -> subprocess.CompletedProcess[str]:
        """The image's ENTRYPOINT (`relay`, found on the final stage's PATH) with ``args``."""
        entrypoint = shutil.which("relay", path=self.env["PATH"])
        assert entrypoint == str(self.venv / "bin" / "relay"), entrypoint
        return _run([entrypoint, *args], env={**self.env, **(env or {})}, timeout=timeout)


def _build_stage(stage: Stage, sandbox: Path, python: str, wheels: Path) -> list[str]:
    """Replay ``stage``'s instructions; return what each RUN printed."""
    venv = sandbox / IMAGE_VENV.lstrip("/")
    shim = sandbox / "shim"
    shim.mkdir(parents=True)
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(python)} "$@"\n')
    (shim / "python").chmod(0o755)
    skipped = ("PIP_", "PYTHON", "VIRTUAL_ENV", "RELAY_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(skipped)}
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', BASE_IMAGE_ENV['PATH'])}"
    workdir = sandbox
    log: list[str] = []
    for keyword, rest in stage.instructions:
        if keyword == "ENV":
            _apply_env(rest, env, venv)
        elif keyword == "WORKDIR":
            workdir = sandbox / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            _copy(rest, workdir)
        elif keyword == "RUN":
            assert not rest.startswith("--"), f"RUN {rest}: flags (--mount ...) are not replayed"
            command = rest.replace(IMAGE_VENV, str(venv))
            # The locked wheels come from the cache instead of the index: nothing else changes.
            run_env = {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
            proc = _run(["/bin/sh", "-c", command], env=run_env, cwd=workdir, timeout=600)
            log.append(f"$ {command}\n{proc.stdout}{proc.stderr}")
            if proc.returncode != 0:
                pytest.fail(
                    f"Dockerfile build stage, RUN exited {proc.returncode}:\n{log[-1]}",
                    pytrace=False,
                )
        elif keyword in {"LABEL", "ARG"}:
            continue
        else:
            pytest.fail(
                f"Dockerfile build stage: {keyword} is not replayed by {Path(__file__).name}",
                pytrace=False,
            )
    return log


def _final_env(final: Stage, venv: Path) -> dict[str, str]:
    env = dict(BASE_IMAGE_ENV)
    for keyword, rest in final.instructions:
        if keyword == "ENV":
            _apply_env(rest, env, venv)
    return env


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    args, stages = _stages()
    build, final = stages[0], stages[-1]
    # The final stage takes the virtualenv from the build stage as it is.
    copies = [rest for keyword, rest in final.instructions if keyword == "COPY"]
    assert f"--from=build {IMAGE_VENV} {IMAGE_VENV}" in copies, copies
    assert build.base.endswith(" AS build"), build.base
    python = _image_python(args)
    wheels = _locked_wheels(python)
    sandbox = tmp_path_factory.mktemp("image")
    log = _build_stage(build, sandbox, python, wheels)
    venv = sandbox / IMAGE_VENV.lstrip("/")
    return Image(venv, _final_env(final, venv), stages, log)


# --- the tests -------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    """The lock's pins whose environment marker holds here (Linux, the image's Python)."""
    pins = re.findall(
        r"(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?:\s*;\s*([^\\\n]*?))?\s*\\?$",
        LOCK.read_text(),
    )
    return {
        _normalize(name): version
        for name, version, marker in pins
        if not marker or Marker(marker).evaluate()
    }


def _venv_python(image: Image, code: str) -> str:
    proc = _run([str(image.venv / "bin" / "python"), "-c", code], env=image.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_build_ran_every_run_instruction(image: Image) -> None:
    runs = [rest for keyword, rest in image.stages[0].instructions if keyword == "RUN"]
    assert len(image.log) == len(runs) >= 3
    installs = " ".join(runs)
    assert "--require-hashes --only-binary=:all: -r requirements.lock" in installs
    assert '--no-index --no-deps --no-build-isolation ".[tools]"' in installs


def test_venv_holds_exactly_the_locked_distributions(image: Image) -> None:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    installed = {_normalize(k): v for k, v in json.loads(_venv_python(image, code)).items()}
    expected = _locked()
    expected.pop("setuptools")  # built the relay, then uninstalled by the build stage
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    expected["outbox-relay"] = pyproject["project"]["version"]
    assert installed == expected


def test_venv_has_no_installer(image: Image) -> None:
    """No pip, setuptools or wheel: neither in the venv nor through the base Python's packages."""
    code = (
        "import importlib.util, json;"
        f"print(json.dumps([n for n in {INSTALLERS!r} if importlib.util.find_spec(n)]))"
    )
    assert json.loads(_venv_python(image, code)) == []
    config = (image.venv / "pyvenv.cfg").read_text()
    assert re.search(r"(?m)^include-system-site-packages = false$", config), config
    scripts = sorted(p.name for p in (image.venv / "bin").iterdir())
    assert not [s for s in scripts if s.startswith(("pip", "easy_install", "wheel"))], scripts
    # The final stage removes them from the base image's Python too.
    final = " ".join(rest for keyword, rest in image.stages[-1].instructions if keyword == "RUN")
    assert "pip uninstall --yes pip setuptools wheel" in final


def test_relay_version(image: Image) -> None:
    proc = image.run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"relay {relay.__version__}"
    # The extra for `relay demo` and `relay bench` is there.
    assert _venv_python(image, "import psutil, relay.tools; print('ok')").strip() == "ok"


@pytest.fixture
def closed_ports() -> Iterator[tuple[int, int]]:
    """Two local TCP ports with nothing listening on them."""
    sockets = [socket.socket(), socket.socket()]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = (sockets[0].getsockname()[1], sockets[1].getsockname()[1])
    for sock in sockets:
        sock.close()
    yield ports


def _relay_env(secrets: Path, **settings: str) -> dict[str, str]:
    secrets.mkdir(exist_ok=True)
    env = {"RELAY_SECRETS_DIR": str(secrets), "HOME": str(secrets.parent)}
    env.update({f"RELAY_{key.upper()}": value for key, value in settings.items()})
    return env


def test_relay_check_without_servers_fails_cleanly(
    image: Image, closed_ports: tuple[int, int], tmp_path: Path
) -> None:
    db_port, kafka_port = closed_ports
    env = _relay_env(
        tmp_path / "secrets",
        db__host="127.0.0.1",
        db__port=str(db_port),
        kafka__bootstrap_servers=f"127.0.0.1:{kafka_port}",
    )
    proc = image.run("check", env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("FAIL database: ") for line in lines), proc.stdout
    assert any(line.startswith("FAIL kafka: ") for line in lines), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.integration
def test_relay_check_and_migrate_against_the_servers(
    image: Image,
    mariadb: servers.MariaDB,
    kafka: servers.Kafka,
    database: str,
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    env = _relay_env(
        secrets,
        db__host=mariadb.host,
        db__port=str(mariadb.port),
        db__user=mariadb.user,
        db__name=database,
        kafka__bootstrap_servers=kafka.bootstrap,
    )
    (secrets / "relay_db__password").write_text(mariadb.password)
    proc = image.run("check", env=env)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert any(line.startswith("FAIL schema: ") for line in proc.stdout.splitlines())
    # migrate runs the SQL files shipped in the package (package data of the installed wheel).
    proc = image.run("migrate", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = image.run("check", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(line.startswith(("ok ", "warn ")) for line in proc.stdout.splitlines()), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
