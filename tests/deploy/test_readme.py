"""README.md against the code: its commands exist with the options it uses, its
configuration table is the ``Settings`` class, and its API paths are the app's.

``python tests/deploy/test_readme.py`` prints the configuration table to paste in.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under each field) of a class."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(name: str, field: object) -> str:
    if getattr(field, "default_factory", None) is not None:
        return "`./data`" if name == "data_dir" else "(computed)"
    value = getattr(field, "default", None)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    from kronscope.config import Settings

    docs = _field_docs(Settings)
    rows = ["| variable | default | what |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        what = docs.get(name, "").replace("|", "\\|")
        rows.append(f"| `KRONSCOPE_{name.upper()}` | {_default(name, field)} | {what} |")
    return "\n".join(rows)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)


def _kronscope_lines() -> list[list[str]]:
    """Every ``kronscope ...`` command in the README's code blocks, as argv after the name."""
    found = []
    for block in _code_blocks(README.read_text()):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split(" #", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|\|)\s*", line):
                words = shlex.split(part) if part else []
                if "kronscope" in [Path(w).name for w in words[:8]]:
                    i = [Path(w).name for w in words].index("kronscope")
                    found.append(words[i + 1 :])
    return found


def test_readme_starts_with_the_two_commands() -> None:
    first = _code_blocks(README.read_text())[0]
    commands = [ln.split("#", 1)[0].strip() for ln in first.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]


def test_every_kronscope_command_in_the_readme_exists_with_its_options() -> None:
    from typer.testing import CliRunner

    from kronscope.cli import app

    lines = _kronscope_lines()
    assert len(lines) >= 8, lines
    for argv in lines:
        # click parses every option before the eager --help: unknown ones fail here
        args = [a for a in argv if not a.startswith("$")]
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"kronscope {' '.join(argv)}\n{result.output}"


def test_make_targets_in_the_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    used = set(re.findall(r"\bmake ([a-z][a-z-]*)", README.read_text()))
    assert used <= targets, used - targets


def test_configuration_table_is_the_settings_class() -> None:
    text = README.read_text()
    for row in settings_table().splitlines()[2:]:
        assert row in text, f"README.md lacks or misstates: {row}"


def test_api_paths_in_the_readme_are_routes() -> None:
    from kronscope.app import create_app
    from kronscope.config import Settings

    paths = set(create_app(Settings()).openapi()["paths"])
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$") for p in paths]
    text = README.read_text()
    used = set(re.findall(r"https?://[^/\s]+(/api/v1/[^\s\"'?]*)", text))
    used |= {"/api/v1" + p for p in re.findall(r"\$API(/[^\s\"'?]*)", text)}
    assert used, "no API examples"
    for path in used:
        path = path.rstrip("/")
        assert any(p.match(path) for p in patterns), f"{path} is not a route"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_is_in_the_readme(script: str) -> None:
    assert f"benchmarks/{script}" in README.read_text()


if __name__ == "__main__":
    print(settings_table())
