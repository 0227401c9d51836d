"""The SDK stands alone: it imports nothing else from this repository and no heavy dependency,
and the base install of the `opsd` distribution (its `dependencies`) carries no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib

from tests.worker.helpers import REPO

REPO_PACKAGES = {"api", "worker", "jobstore", "opsd_engine", "opsd_service", "opsd_cli"}
HEAVY = {"torch", "transformers", "peft", "fastapi", "sqlalchemy", "celery", "plotly"}
ALLOWED_THIRD_PARTY = {"httpx", "pydantic", "typer", "rich", "yaml", "matplotlib"}
BASE_DEPENDENCIES = {"httpx", "pydantic", "typer", "rich", "pyyaml", "pydantic-settings"}


def _requirement_name(requirement: str) -> str:
    name = requirement
    for separator in "[<>=!~; ":
        name = name.split(separator, 1)[0]
    return name.strip().lower()


def test_importing_the_sdk_and_its_cli_loads_nothing_else_from_the_repo() -> None:
    code = (
        "import json, sys\n"
        "import opsd_client, opsd_client.cli\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert not loaded & REPO_PACKAGES, loaded & REPO_PACKAGES
    assert not loaded & HEAVY, loaded & HEAVY


def test_sdk_sources_import_only_the_stdlib_and_the_base_dependencies() -> None:
    for path in sorted((REPO / "opsd_client").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = top == "opsd_client" or top in sys.stdlib_module_names
                assert allowed or top in ALLOWED_THIRD_PARTY, f"{path.name} imports {name}"


def test_the_base_install_is_the_sdk_and_the_heavy_parts_are_extras() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert base == BASE_DEPENDENCIES
    extras = project["optional-dependencies"]
    assert "torch" in {_requirement_name(r) for r in extras["engine"]}
    assert {"fastapi", "plotly"} <= {_requirement_name(r) for r in extras["api"]}
    assert any("service" in r for r in extras["all"])
    assert "playwright" in {_requirement_name(r) for r in extras["dev"]}
