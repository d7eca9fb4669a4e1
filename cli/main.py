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


# Commands that read a data set: their first log line names the one in use.
_DATA_COMMANDS = {"data", "train", "index", "eval", "export", "experiment", "demo-build", "load-history"}


@app.callback()
def _main(
    ctx: typer.Context,
    log_level: Annotated[str, typer.Option(envvar="RELLAX_LOG_LEVEL")] = "INFO",
    dataset: Annotated[
        Path | None,
        typer.Option(
            envvar="RELLAX_DATASET",
            help="Data set for every command: a folder of RecBole atomic files + dataset.toml, or of "
            "ML-1M .dat files. Unset: the bundled MovieLens-100K.",
        ),
    ] = None,
) -> None:
    configure_logging(log_level)
    import os

    if dataset is not None:
        os.environ["RELLAX_DATASET"] = str(dataset)  # read by data.loading in every step
    if ctx.invoked_subcommand in _DATA_COMMANDS:
        from rellax.logs import get_logger

        get_logger("cli").info("data set in use", source=str(dataset) if dataset else "bundled ml-100k")


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
    dataset: Annotated[
        Path | None,
        typer.Option(
            help="Folder of RecBole atomic files (NAME.inter, NAME.item, optional NAME.user, "
            "dataset.toml) or of ML-1M .dat files [default: the root --dataset / the bundled ML-100K]."
        ),
    ] = None,
    ml1m: Annotated[Path | None, typer.Option(hidden=True, help="Old name of --dataset.")] = None,
) -> None:
    """Check a data set, build (or reuse) its CTR samples and print their manifest; a bad file
    fails naming the file, line and field, and nothing is written."""
    import json

    from data.loading import load_dataset

    _, _, manifest = load_dataset(dataset or ml1m)
    typer.echo(json.dumps(manifest, indent=2))


@data_app.command("from-csv")
def data_from_csv(
    interactions: Annotated[
        Path, typer.Option(help="CSV with user_id, item_id, rating (or label), timestamp.")
    ],
    items: Annotated[Path, typer.Option(help="CSV with item_id, title (and the --category column).")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.inter, NAME.item and dataset.toml.")],
    name: Annotated[str, typer.Option(help="The data set's name (file stem).")],
    noun: Annotated[str, typer.Option(help="What an item is called in the prompt.")] = "item",
    verb: Annotated[str, typer.Option(help="Past tense of consuming one (watched, read, bought).")] = (
        "interacted with"
    ),
    verb_next: Annotated[str | None, typer.Option(help="Its base form (watch, read, buy).")] = None,
    label: Annotated[
        bool, typer.Option(help="The interactions carry a 0/1 label column, not ratings.")
    ] = False,
    category: Annotated[
        str | None, typer.Option(help="An items column whose first word is the category.")
    ] = None,
) -> None:
    """Turn a plain CSV export into RecBole atomic files and a starter dataset.toml."""
    from data.csv_import import csv_to_atomic

    folder = csv_to_atomic(interactions, items, out, name=name, noun=noun, verb=verb, verb_next=verb_next,
                           label=label, category=category)  # fmt: skip
    typer.echo(
        f"wrote {folder}: {name}.inter, {name}.item, dataset.toml "
        f"(next: rellax --dataset {folder} data prepare)"
    )


def _register_package_commands() -> None:
    """Packages add their own commands; a package not yet built simply adds none."""
    import importlib

    for module in ("index.cli", "training.cli", "service.cli"):
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
    from rellax.allocator import reexec_with_tuning
    from rellax.errors import RellaxError

    reexec_with_tuning()  # glibc reads its malloc settings only at start-up (rellax/allocator.py)
    try:
        app()
    except RellaxError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
