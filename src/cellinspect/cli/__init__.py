"""`cellinspect` command line: thin Typer commands over the packages' functions."""

from __future__ import annotations

import logging

import typer

from cellinspect import __version__
from cellinspect.cli import data as data_cli
from cellinspect.cli import models as models_cli
from cellinspect.cli import pipeline, serve
from cellinspect.cli.common import console, user_errors
from cellinspect.home import Home

app = typer.Typer(
    help="Defect inspection for battery cell production: data, training, export, model store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cli.app, name="data")
app.add_typer(models_cli.app, name="models")
app.command("train")(pipeline.train)
app.command("export")(pipeline.export)
app.command("demo")(pipeline.demo)
app.command("serve")(serve.serve)
app.command("camera")(serve.camera)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@app.command("info")
def info() -> None:
    """Print the version and where the home directory and its parts are."""
    home = Home.resolve()
    console.print(f"cellinspect {__version__}")
    console.print(f"home      {home.root}   (set CELLINSPECT_HOME to move it)")
    for part in ("datasets", "runs", "store", "archive", "heldout", "evals"):
        console.print(f"  {part:<9}{getattr(home, part)}")
    console.print(f"  database {home.database_url}")


def main() -> None:
    """Console entry point: user errors end with one clear line and exit code 2."""
    with user_errors():
        app()


if __name__ == "__main__":
    main()
