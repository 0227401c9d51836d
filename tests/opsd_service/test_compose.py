"""The compose stack and the Dockerfile, checked without Docker: services and their wiring,
every command a real `opsd` subcommand, every `OPSD_*` variable a real setting with a URL of
the right kind, and the image installing what the commands need."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from opsd_service.settings import ServiceSettings
from tests.worker.helpers import REPO

OPSD_SERVICES = ("migrate", "api", "worker")
# What the service processes import beyond the engine; each must be installed in the image.
SERVICE_REQUIREMENTS = {
    "celery",
    "fastapi",
    "uvicorn",
    "pydantic-settings",
    "sqlalchemy",
    "psycopg",
    "alembic",
    "httpx",
    "typer",
    "fsspec",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def resolve_opsd_command(argv: list[str]) -> str:
    """Check `opsd ...` against the real command tree; returns the help text it resolves to.

    `--help` is eager, but the arguments before it are still parsed: an unknown command or
    option exits with a usage error.
    """
    from opsd_cli import app

    assert argv[0] == "opsd", argv
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, f"{shlex.join(argv)}: {result.output}"
    return result.output


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_services_and_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", *OPSD_SERVICES} <= set(services)
    expected = {"migrate": "migrate", "api": "api", "worker": "worker"}
    for name in OPSD_SERVICES:
        command = services[name]["command"]
        argv = command if isinstance(command, list) else shlex.split(command)
        assert argv[:2] == ["opsd", expected[name]]
        resolve_opsd_command(argv)
        assert services[name]["image"] == services["api"]["image"]  # one image
    assert "0.0.0.0" in services["api"]["command"]


def test_unknown_commands_are_caught() -> None:
    with pytest.raises(AssertionError, match="No such command"):
        resolve_opsd_command(["opsd", "no-such-command"])
    with pytest.raises(AssertionError, match="No such option"):
        resolve_opsd_command(["opsd", "api", "--no-such-option"])
    assert "Serve the HTTP API" in resolve_opsd_command(["opsd", "api", "--host", "0.0.0.0"])


def test_healthchecks_and_startup_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart") == "no"


def test_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_environment_is_real_settings_with_the_right_urls(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.utils.url import url_to_parts
    from sqlalchemy.engine import make_url

    fields = set(ServiceSettings.model_fields)
    for name in OPSD_SERVICES:
        env = _environment(compose["services"][name])
        opsd_vars = {k: v for k, v in env.items() if k.startswith("OPSD_")}
        assert {"OPSD_DATABASE_URL", "OPSD_BROKER_URL", "OPSD_ARTIFACTS_URI"} <= set(opsd_vars)
        for key, value in opsd_vars.items():
            assert key.removeprefix("OPSD_").lower() in fields, f"{name}: {key} is no setting"
            monkeypatch.setenv(key, value)
        settings = ServiceSettings()
        url = make_url(settings.database_url)
        assert (url.get_backend_name(), url.get_driver_name()) == ("postgresql", "psycopg")
        assert url.host == "postgres"
        assert url_to_parts(settings.broker_url).scheme == "redis"
        assert url_to_parts(settings.broker_url).hostname == "redis"
        for key in opsd_vars:
            monkeypatch.delenv(key)


def test_artifacts_volume_is_shared_at_the_same_path(compose: dict[str, Any]) -> None:
    assert "artifacts" in compose["volumes"]
    for name in ("api", "worker"):
        service = compose["services"][name]
        target = _environment(service)["OPSD_ARTIFACTS_URI"]
        mounts = dict(v.split(":", 1) for v in service["volumes"] if isinstance(v, str))
        assert mounts.get("artifacts") == target, (name, mounts)


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _requirement_name(spec: str) -> str:
    name = re.split(r"[\[<>=!~; ]", spec.strip().strip("\"'"), maxsplit=1)[0]
    return name.lower().replace("_", "-")


def test_dockerfile_base_command_and_installs(dockerfile: str) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = {rest.split("=", 1)[0] for keyword, rest in instructions if keyword == "ARG"}
    assert "TORCH_SPEC" in args

    cmd = next(rest for keyword, rest in reversed(instructions) if keyword == "CMD")
    argv = json.loads(cmd)
    assert not any(keyword == "ENTRYPOINT" for keyword, _ in instructions)
    resolve_opsd_command(argv)

    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    installed: set[str] = set()
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installed |= {
                    _requirement_name(w)
                    for w in words[2:]
                    if not w.startswith(("-", "$")) and "://" not in w
                }
    assert any("${TORCH_SPEC}" in run for run in runs)
    assert any(re.search(r"pip install -e \"?\.(\[[\w,]+\])?\"?", run) for run in runs)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed |= {_requirement_name(d) for d in project["dependencies"]}
    extras = project.get("optional-dependencies", {})

    def expand(names: set[str], seen: set[str]) -> set[str]:
        """Requirement names of the extras `names`, following `opsd[other]` references."""
        out: set[str] = set()
        for extra in names - seen:
            seen.add(extra)
            for requirement in extras.get(extra, []):
                if requirement.startswith(f"{project['name']}["):
                    inner = requirement.split("[", 1)[1].split("]")[0]
                    out |= expand(set(inner.split(",")), seen)
                else:
                    out.add(_requirement_name(requirement))
        return out

    for run in runs:
        for match in re.finditer(r'pip install -e "?\.\[([\w,]+)\]', run):
            installed |= expand(set(match.group(1).split(",")), set())
    assert {"torch", "transformers", "peft", "accelerate"} <= installed, (
        "the worker needs the engine"
    )
    missing = SERVICE_REQUIREMENTS - installed
    assert not missing, f"the image does not install {sorted(missing)}"
    assert "celery[redis]" in dockerfile  # the Redis transport's client


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs"} <= ignored


def test_vllm_serves_adapters_for_the_evals(compose: dict[str, Any]) -> None:
    """vLLM's OpenAI server with runtime LoRA loading, a rank limit covering what the API
    accepts, the artifacts read-only at the path the adapters' URIs name, and the API/worker
    pointed at it."""
    services = compose["services"]
    vllm = services["vllm"]
    assert vllm["image"].split(":", 1)[0] == "vllm/vllm-openai"
    argv = [str(a) for a in vllm["command"]]
    assert "--enable-lora" in argv

    def option(name: str) -> str:
        assert name in argv, f"vllm: {name} missing"
        return argv[argv.index(name) + 1]

    assert int(option("--max-loras")) >= 1
    assert option("--port") == "8000"
    assert _environment(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"].lower() in ("1", "true")
    assert any(
        d["driver"] == "nvidia" for d in vllm["deploy"]["resources"]["reservations"]["devices"]
    )
    mounts = [v for v in vllm["volumes"] if isinstance(v, str) and v.startswith("artifacts:")]
    for name in ("api", "worker"):
        env = _environment(services[name])
        settings = ServiceSettings(
            **{k.removeprefix("OPSD_").lower(): v for k, v in env.items() if k.startswith("OPSD_")}
        )
        assert int(option("--max-lora-rank")) >= settings.max_lora_rank, name
        assert mounts == [f"artifacts:{settings.artifacts_uri}:ro"], (name, mounts)
        assert settings.inference_url == "http://vllm:8000", name
