"""``kronscope db upgrade`` / ``kronscope db current`` on a temporary SQLite file."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from kronscope.commands import db as db_command
from kronscope.db.engine import current_revision, head_revision


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    db_command.register(app)
    return app


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    app = _app()

    before = runner.invoke(app, ["db", "current", "--url", url])
    assert before.exit_code == 0, before.output
    assert "empty" in before.output and "needs" in before.output

    result = runner.invoke(app, ["db", "upgrade", "--url", url])
    assert result.exit_code == 0, result.output
    assert f"upgraded empty -> {head_revision()}" in result.output
    assert current_revision(url) == head_revision()

    again = runner.invoke(app, ["db", "upgrade", "--url", url])
    assert again.exit_code == 0 and "already at" in again.output

    after = runner.invoke(app, ["db", "current", "--url", url])
    assert after.exit_code == 0 and "up to date" in after.output


def test_db_upgrade_uses_settings(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kronscope.config import get_settings

    monkeypatch.setenv("KRONSCOPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("KRONSCOPE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(_app(), ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "data" / "kronscope.db").is_file()
    finally:
        get_settings.cache_clear()


def test_db_unreachable_exits_2() -> None:
    result = CliRunner().invoke(
        _app(), ["db", "current", "--url", "postgresql+psycopg://postgres@127.0.0.1:1/x"]
    )
    assert result.exit_code == 2
    assert "cannot be reached" in result.output


def test_registered_in_the_real_cli() -> None:
    from kronscope.cli import app

    result = CliRunner().invoke(app, ["db", "--help"])
    assert result.exit_code == 0 and "upgrade" in result.output and "current" in result.output
