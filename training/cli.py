"""Every `rellax` command of the offline pipeline; each body calls into its stage's package.

    rellax train crm | sasrec | llmsrec     training.crm (DIN + baselines), training.llmsrec
    rellax train rella | rellax             training.llm (stage 1 / stage 2)
    rellax eval | export | demo-build       training.llm, training.demo
    rellax experiment ...                   training.study (the quality study), training.llmsrec

Each recipe is one command on `train_app`; to add one, define another `@train_app.command("name")`
function below. Top-level commands (eval, export) get a line in `register`. Heavy imports (torch,
sklearn, the recipes) stay inside the command bodies so `rellax --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.config import with_config
from training.crm.config import CRMConfig
from training.demo import DEMO_EVAL_ROWS, DEMO_ROWS, DEMO_VALID_ROWS
from training.llm.config import EvalConfig, Stage1Config, Stage2Config
from training.llmsrec.config import LLMSRecConfig, RankingConfig, SASRecTrainConfig
from training.study.config import ExperimentConfig
from training.study.tune_config import TuneConfig

__all__ = ["register", "train_app"]

train_app = typer.Typer(help="Train models.", no_args_is_help=True)

Force = Annotated[bool, typer.Option(help="Retrain even if a finished run is in --out.")]

Nproc = Annotated[
    int,
    typer.Option(help="Processes on this machine (launches torchrun; --batch-size is per process)."),
]
ModelDir = Annotated[Path | None, typer.Option(help="Base LLM dir (default: the bundled SmolLM2).")]
IndexDir = Annotated[
    Path | None, typer.Option(help="Item index dir (default: the data set's, for this LLM: cache/index/...).")
]


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `rellax` app."""
    app.add_typer(train_app, name="train")
    app.command("eval")(evaluate)
    app.command("export")(export)
    app.command("demo-build")(demo)
    app.add_typer(experiment_app, name="experiment")


@train_app.command("crm")
@with_config(CRMConfig, recipe="crm")
def train_crm(cfg: CRMConfig) -> None:
    """Train DIN (the conventional CTR model) and its baselines; print and save their metrics."""
    from training.crm.crm import main

    _print_crm_metrics(main(cfg))


@train_app.command("sasrec")
@with_config(SASRecTrainConfig, recipe="sasrec")
def train_sasrec(cfg: SASRecTrainConfig) -> None:
    """Train SASRec, LLM-SRec's collaborative teacher; print its ranking metrics (1 positive vs 99)."""
    from training.llmsrec.sasrec import main

    result = main(cfg)
    valid, test = result["valid"], result["test"]
    typer.echo(
        f"SASRec valid NDCG@10 {valid.get('ndcg@10', 0):.4f} (epoch {valid.get('epoch')}), "
        f"test HR@10 {test['hr@10']:.4f} NDCG@10 {test['ndcg@10']:.4f} on {test['n']} users; {cfg.out}"
    )


@train_app.command("llmsrec")
@with_config(LLMSRecConfig, recipe="llmsrec")
def train_llmsrec(
    cfg: LLMSRecConfig,
    hours: Annotated[float | None, typer.Option(help="Pause (resumably) after this long.")] = None,
) -> None:
    """Train LLM-SRec over the frozen LLM, distilling SASRec; print its ranking metrics."""
    import time

    from training.llmsrec.llmsrec import main

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


def _maybe_launch(nproc: int) -> None:
    """With --nproc N > 1 outside torchrun, run this same command under torchrun and exit with its
    status; inside torchrun (or N = 1) return and train here."""
    import os
    import subprocess
    import sys

    from training.llm.distributed import launch_command, under_torchrun

    if nproc < 1:
        raise typer.BadParameter(f"must be >= 1, got {nproc}", param_hint="--nproc")
    if nproc == 1 or under_torchrun():
        return
    argv, skip = [], False
    for arg in sys.argv[1:]:  # the same command, minus --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    raise typer.Exit(subprocess.call(launch_command(nproc, argv), env=os.environ.copy()))


def _echo_result(metrics: dict) -> None:
    import json

    from training.llm.distributed import is_main

    if is_main():
        typer.echo(json.dumps(metrics["result"], indent=2))


@train_app.command("rella")
@with_config(Stage1Config, recipe="rella")
def rella(cfg: Stage1Config, nproc: Nproc = 1, force: Force = False) -> None:
    """Stage 1 (ReLLa): peft LoRA (q_proj/v_proj by default), selected on validation AUC."""
    _maybe_launch(nproc)
    from training.llm.stage1 import main

    _echo_result(main(cfg, force=force))


@train_app.command("rellax")
@with_config(Stage2Config, recipe="rellax")
def rellax(cfg: Stage2Config, nproc: Nproc = 1, force: Force = False) -> None:
    """Stage 2 (ReLLaX): SPA projector and/or CFLoRA gates over the frozen stage-1 model."""
    _maybe_launch(nproc)
    from training.llm.stage2 import main

    _echo_result(main(cfg, force=force))


@with_config(EvalConfig, recipe="eval")
def evaluate(
    cfg: EvalConfig,
    stage2: Annotated[list[str] | None, typer.Option(help="mode=DIR of a stage-2 run (repeatable).")] = None,
) -> None:
    """AUC / LogLoss / accuracy of every mode and the DIN on the same seeded rows."""
    from training.llm.evaluate import eval_markdown, main

    for spec in stage2 or []:
        mode, sep, folder = spec.partition("=")
        if not sep or mode not in ("rella", "spa", "cflora", "rellax"):
            raise typer.BadParameter(
                f"{spec!r} is not MODE=DIR (rella, spa, cflora, rellax)", param_hint="--stage2"
            )
        cfg.stage2[mode] = Path(folder)
    typer.echo(eval_markdown(main(cfg)))


def export(
    stage2: Annotated[Path | None, typer.Option(help="Stage-2 run dir.")] = None,
    out: Annotated[Path | None, typer.Option(help="Bundle dir [default: cache/bundles/demo].")] = None,
    eval_json: Annotated[Path | None, typer.Option(help="eval.json to record in the manifest.")] = None,
    merged: Annotated[bool, typer.Option(help="Also write merged/ for vLLM.")] = True,
    llmsrec: Annotated[
        Path | None, typer.Option(help="A `rellax train llmsrec` output dir to serve beside ReLLaX.")
    ] = None,
    din_dir: Annotated[Path | None, typer.Option(help="Frozen DIN dir (default: the data set's).")] = None,
    model_dir: ModelDir = None,
    index_dir: IndexDir = None,
) -> None:
    """Write the bundle (and the merged vLLM checkpoint) from a stage-2 run."""
    from training.llm.export import ExportConfig, main

    cfg = ExportConfig(
        eval_json=eval_json, merged=merged, llmsrec=llmsrec, model_dir=model_dir, index_dir=index_dir
    )
    if din_dir:
        cfg.din_dir = din_dir
    if stage2:
        cfg.stage2 = stage2
    if out:
        cfg.out = out
    manifest = main(cfg)
    typer.echo(f"bundle {manifest['model_version']} written to {cfg.out}")


def demo(
    n_rows: Annotated[int, typer.Option(help="Few-shot rows per stage.")] = DEMO_ROWS,
    eval_rows: Annotated[int, typer.Option(help="Test rows in the demo's eval table.")] = DEMO_EVAL_ROWS,
    valid_rows: Annotated[int, typer.Option(help="Validation rows for selection.")] = DEMO_VALID_ROWS,
    train_here: Annotated[
        bool, typer.Option(help="Train demo-size stages here instead of using the study's committed run.")
    ] = False,
) -> None:
    """Everything offline, end to end on the bundled defaults (cached on the second run)."""
    from training.demo import build

    typer.echo(build(n_rows=n_rows, eval_rows=eval_rows, valid_rows=valid_rows, train_here=train_here))


experiment_app = typer.Typer(help="The quality study: resumable runs and the report.")


@experiment_app.command("ml100k")
@with_config(ExperimentConfig)
def experiment_ml100k(
    cfg: ExperimentConfig,
    hours: Annotated[float | None, typer.Option(help="Pause (resumably) after this long.")] = None,
    report: Annotated[bool, typer.Option(help="Render docs/results.md at the end.")] = True,
) -> None:
    """Run every unfinished step of the ML-100K study, then render the report. Run it again to resume."""
    from training.study.experiment import plan, run

    if hours is not None:
        cfg.max_seconds = hours * 3600
    unknown = sorted(set(cfg.only) - set(plan(cfg)))
    if unknown:
        raise typer.BadParameter(f"unknown steps {unknown}", param_hint="--only")
    for step, state in run(cfg).items():
        typer.echo(f"{step:22s} {state}")
    if report:
        experiment_report(results=cfg.results, out=cfg.results.parent / "results.md")


@experiment_app.command("ranking")
@with_config(RankingConfig)
def experiment_ranking(cfg: RankingConfig) -> None:
    """DIN, SASRec and LLM-SRec (and with --bundle ReLLaX and the cascade at M 5/10/20) ranking the
    same test cases (1 liked vs 99 never-seen items per user): HR/NDCG@10/20, paired intervals, and
    the history-shuffle diagnostic."""
    from training.llmsrec.ranking_eval import run

    result = run(cfg)
    for name, m in result["models"].items():
        drop = f", shuffled -{m['shuffle_drop']:.1%}" if "shuffle_drop" in m else ""
        typer.echo(f"{name:9s} NDCG@10 {m['ndcg@10']:.4f} HR@10 {m['hr@10']:.4f}{drop}")


@experiment_app.command("tune")
@with_config(TuneConfig)
def experiment_tune(
    cfg: TuneConfig,
    hours: Annotated[float | None, typer.Option(help="Pause (resumably) after this long.")] = None,
    report: Annotated[bool, typer.Option(help="Render docs/results.md at the end.")] = True,
) -> None:
    """Short trials of stage 1 / stage 2 recipes under one time budget each: valid AUC against
    examples and training seconds. Resumable: run it again to continue."""
    from training.study.tune import run

    if hours is not None:
        cfg.max_seconds = hours * 3600
    for trial, state in run(cfg).items():
        typer.echo(f"{trial:22s} {state}")
    if report:
        experiment_report(results=cfg.results.parent, out=cfg.results.parent.parent / "results.md")


@experiment_app.command("report")
def experiment_report(
    results: Annotated[Path, typer.Option(help="The steps' JSON folder.")] = Path("docs/results"),
    out: Annotated[Path, typer.Option(help="The markdown report.")] = Path("docs/results.md"),
) -> None:
    """Render docs/results.md (and learning_curves.png) from the study's JSON files."""
    from training.study.report import render

    render(results, out)
    typer.echo(f"wrote {out}")


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
