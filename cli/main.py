"""The `rellax` command line (`rellax = "cli.main:main"`; `python -m cli` runs the same). Each package
registers its own commands; heavy imports stay inside them so `rellax --help` is instant and never
imports torch or vLLM. This is the top layer: it may import every package, and none imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rellax.logs import configure_logging

app = typer.Typer(help="ReLLaX CTR scoring: prepare assets, train, index, evaluate, export, serve.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)  # fmt: skip
models_app = typer.Typer(help="The scoring LLM.", no_args_is_help=True)
data_app = typer.Typer(help="Data sets and CTR samples.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


@app.callback()
def _main(log_level: Annotated[str, typer.Option(envvar="RELLAX_LOG_LEVEL")] = "INFO") -> None:
    configure_logging(log_level)


@models_app.command("prepare")
def models_prepare(
    source: Annotated[Path | None, typer.Option(help="Use this Hugging Face model dir instead.")] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False,
) -> None:
    """Convert the packaged SmolLM2 GGUF into a Hugging Face model dir in the cache (once)."""
    from rellax.assets import prepare_model

    typer.echo(prepare_model(source=source, force=force))


@data_app.command("prepare")
def data_prepare(
    ml1m: Annotated[Path | None, typer.Option(help="Folder with ML-1M users/movies/ratings.dat.")] = None,
) -> None:
    """Build (or reuse) the CTR samples and print their manifest."""
    import json

    from data.loading import load_dataset

    _, _, manifest = load_dataset(ml1m)
    typer.echo(json.dumps(manifest, indent=2))


def _register_package_commands() -> None:
    """Packages add their own commands; a package not yet built simply adds none."""
    import importlib

    for module in ("index.cli", "training.cli", "training.llm_cli", "service.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_package_commands()


def main() -> None:
    """The console entry point: rellax's own errors (`rellax.errors`) end the command with their
    message and exit status 1, not a traceback; anything else is a bug and keeps its traceback."""
    from rellax.errors import RellaxError

    try:
        app()
    except RellaxError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
