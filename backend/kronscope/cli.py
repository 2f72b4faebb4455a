"""The ``kronscope`` command. Each sub-command lives in ``kronscope.commands.<name>`` and
exposes ``register(app)``; this module only assembles them, so adding a command never
touches another one's code."""

from __future__ import annotations

import importlib
import pkgutil

import typer

from . import __version__, commands

app = typer.Typer(
    name="kronscope",
    help="KronScope: train, evaluate, harvest and browse KronSAE (and TopK) sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kronscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """KronScope command line."""


for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{commands.__name__}.{_info.name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
