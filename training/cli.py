"""`rellax train ...` (and, later, `rellax eval` / `rellax export`): the offline pipeline's commands.

Each recipe is one command on `train_app`; to add one, define another `@train_app.command("name")`
function below. Top-level commands (eval, export) get a line in `register`. Heavy imports (torch,
sklearn, the recipes) stay inside the command bodies so `rellax --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "train_app"]

train_app = typer.Typer(help="Train models.", no_args_is_help=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides as key=value (YAML values).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML config (default: the recipe's).")]


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `rellax` app."""
    app.add_typer(train_app, name="train")


@train_app.command("crm")
def train_crm(
    overrides: Overrides = None,
    config: ConfigFile = None,
    out: Annotated[Path | None, typer.Option(help="Model folder (default: cache/crm/din).")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Maximum epochs (early stopping may end sooner).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    patience: Annotated[int | None, typer.Option(help="Epochs without a better valid AUC.")] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(
            help="Data set folder: atomic files or ML-1M .dat [env RELLAX_DATASET; default ML-100K]."
        ),
    ] = None,
    baselines: Annotated[
        bool | None, typer.Option(help="Also fit the LR and rating-prior baselines.")
    ] = None,
) -> None:
    """Train DIN (the conventional CTR model) and its baselines; print and save their metrics."""
    from training.crm import load_config, main

    try:
        cfg = load_config(
            config,
            overrides,
            out=str(out) if out else None,
            max_epochs=epochs,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
            patience=patience,
            dataset=str(dataset) if dataset else None,
            baselines=baselines,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _print_crm_metrics(main(cfg))


@train_app.command("sasrec")
def train_sasrec(
    out: Annotated[Path | None, typer.Option(help="Model folder (default: cache/sasrec/ml100k).")] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping may end sooner).")] = 60,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train SASRec, LLM-SRec's collaborative teacher; print its ranking metrics (1 positive vs 99)."""
    from training.sasrec import SASRecTrainConfig, main

    cfg = SASRecTrainConfig(max_epochs=epochs, seed=seed)
    if out is not None:
        cfg.out = out
    result = main(cfg)
    valid, test = result["valid"], result["test"]
    typer.echo(
        f"SASRec valid NDCG@10 {valid.get('ndcg@10', 0):.4f} (epoch {valid.get('epoch')}), "
        f"test HR@10 {test['hr@10']:.4f} NDCG@10 {test['ndcg@10']:.4f} on {test['n']} users; {cfg.out}"
    )


@train_app.command("llmsrec")
def train_llmsrec(
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    sasrec_dir: Annotated[
        Path | None, typer.Option(help="The trained teacher (rellax train sasrec).")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Base LLM folder (default: the bundled SmolLM2).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: cache/llmsrec/ml100k).")] = None,
    hours: Annotated[float | None, typer.Option(help="Pause (resumably) after this long.")] = None,
    eval_every: Annotated[
        int, typer.Option(help="Steps between validations (each ranks with a fresh catalogue pass).")
    ] = 50,
    valid_users: Annotated[int | None, typer.Option(help="Validation users (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Users per optimizer step.")] = 8,
) -> None:
    """Train LLM-SRec over the frozen LLM, distilling SASRec; print its ranking metrics."""
    import time

    from training.llmsrec import LLMSRecConfig, main

    cfg = LLMSRecConfig(
        steps=steps,
        model_dir=model_dir,
        eval_every=eval_every,
        valid_users=valid_users,
        batch_size=batch_size,
    )
    cfg.out = out or cfg.out
    cfg.sasrec_dir = sasrec_dir or cfg.sasrec_dir
    if not (cfg.sasrec_dir / "sasrec.safetensors").exists():
        raise typer.BadParameter(
            f"no SASRec in {cfg.sasrec_dir}: run `rellax train sasrec` first", param_hint="--sasrec-dir"
        )
    deadline = None if hours is None else time.monotonic() + hours * 3600
    try:
        result = main(cfg, deadline=deadline)
    except TimeoutError as paused:
        typer.echo(str(paused))
        return
    test = result["test"]
    figures = f"HR@10 {test['hr@10']:.4f} NDCG@10 {test['ndcg@10']:.4f} on {test['n']} users"
    typer.echo(f"LLM-SRec test {figures}; {cfg.out}")


def _print_crm_metrics(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CTR on the test split (n={metrics['din']['test']['n']})")
    for column in ("model", "test AUC", "test LogLoss", "valid AUC", "train s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [("DIN", metrics["din"], metrics["train_seconds"])]
    rows += [
        (name.upper() if name == "lr" else name, r, r["fit_seconds"])
        for name, r in metrics["baselines"].items()
    ]
    for name, r, seconds in rows:
        table.add_row(
            name,
            f"{r['test']['auc']:.4f}",
            f"{r['test']['logloss']:.4f}",
            f"{r['valid']['auc']:.4f}",
            f"{seconds:.1f}",
        )
    console = Console()
    console.print(table)
    for name, d in metrics.get("din_minus_baseline_test_auc", {}).items():
        console.print(f"DIN - {name} test AUC: {d['diff']:+.4f} (95% CI {d['lo']:+.4f} .. {d['hi']:+.4f})")
    epochs = f"epochs {metrics['epochs']} (best {metrics['best_epoch']})"
    console.print(f"{epochs}; model and metrics.json in {metrics['out']}")
