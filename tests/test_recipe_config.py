"""One typed config per recipe (training/config.py): YAML files, key=value overrides and the
generated CLI options resolve to one validated config, and every problem is reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from training import config
from training.config import CONFIG_DIR, ConfigError, leaf_fields, load_config
from training.crm.config import CRMConfig
from training.llm.config import DEFAULT_K, EvalConfig, LoopConfig, Stage1Config, Stage2Config
from training.study.experiment import ExperimentConfig
from training.study.tune_config import TRIALS, TuneConfig

RECIPES = config.recipes()


def _app() -> typer.Typer:
    from training.cli import register

    app = typer.Typer()
    register(app)
    return app


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(_app(), list(args), env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    return result.exit_code, result.output


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipes_defaults_file_is_its_typed_defaults(recipe: str) -> None:
    """training/configs/<recipe>.yaml is written from the dataclass (run `python -m training.config`
    after changing a field), and loading it changes nothing."""
    shipped = (CONFIG_DIR / f"{recipe}.yaml").read_text()
    assert shipped == config.defaults_yaml(recipe), f"regenerate: python -m training.config ({recipe})"
    assert str(Path.home()) not in shipped  # no machine's paths: cache folders are written portably
    assert ("$RELLAX_CACHE_DIR/" in shipped) == (recipe != "crm")
    cls = RECIPES[recipe]
    assert load_config(cls, CONFIG_DIR / f"{recipe}.yaml") == cls()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*-*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_variant_loads_by_name(path: Path) -> None:
    cls = RECIPES[path.stem.split("-")[0]]
    by_name = load_config(cls, path.stem)
    assert by_name == load_config(cls, path)
    assert by_name != cls()  # a variant that changes nothing is not a variant


def test_the_one_stage_variant_is_the_studys_rellax_recipe() -> None:
    study, s2 = ExperimentConfig(), load_config(Stage2Config, "rellax-one-stage")
    s1 = load_config(Stage1Config, "rella-init")
    assert (s2.n_rows, s2.k, s2.valid_rows, s2.prompts, s2.train_lora) == (
        max(study.n_values),
        study.k,
        study.valid_rows,
        study.prompts,
        True,
    )
    assert (s2.loop.lr, s2.loop.batch_size, s2.loop.micro_batch, s2.loop.epochs, s2.loop.evals_per_epoch) == (
        study.stage2_lr,
        study.batch_size,
        study.micro_batch,
        study.epochs,
        study.evals_per_epoch,
    )
    assert (s1.loop.epochs, s1.k) == (0, study.k)


def test_precedence_defaults_file_overrides_values(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("k: 7\nn_rows: 100\nloop:\n  lr: 0.002\n  batch_size: 16\n")
    cfg = load_config(
        Stage2Config,
        path,
        ["n_rows=50", "loop.batch_size=32", "lr=5e-4"],
        {"k": 9, "valid_rows": None, "seed": 3},
    )
    assert (cfg.k, cfg.n_rows, cfg.valid_rows) == (9, 50, 256)  # values > overrides > file > defaults
    assert (cfg.loop.lr, cfg.loop.batch_size, cfg.loop.seed, cfg.loop.epochs) == (5e-4, 32, 3, 1)
    assert isinstance(cfg.out, Path) and isinstance(cfg.loop, LoopConfig)
    assert load_config(Stage1Config, overrides=["target_modules=[q_proj, k_proj]"]).target_modules == (
        "q_proj",
        "k_proj",
    )
    # A stage's loop defaults are its own: stage 2 starts at 3e-4, stage 1 at 1e-3.
    assert load_config(Stage2Config).loop.lr == 3e-4 and load_config(Stage1Config).loop.lr == 1e-3
    assert load_config(Stage1Config).k == load_config(EvalConfig).k == DEFAULT_K


def test_every_problem_is_reported_at_once_naming_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            Stage2Config,
            overrides=["lr=abc", "mode=both", "bogus=1", "k=0", "loop.epochs=-1", "no-equals"],
        )
    problems = "\n".join(exc.value.problems)
    for expected in (
        "loop.lr='abc'",
        "mode='both'",
        "bogus",
        "k=0 must be > 0",
        "loop.epochs=-1",
        "no-equals",
    ):
        assert expected in problems, problems
    assert len(exc.value.problems) == 6
    with pytest.raises(ValueError, match="no such file, nor a shipped config"):
        load_config(Stage1Config, "rella-nonexistent")
    broken = tmp_path / "broken.yaml"
    broken.write_text("k: [5\n")
    with pytest.raises(ConfigError, match="not YAML"):
        load_config(Stage1Config, broken)
    broken.write_text("- k\n- 5\n")
    with pytest.raises(ConfigError, match="a YAML mapping of settings is needed"):
        load_config(Stage1Config, broken)
    with pytest.raises(ConfigError, match="dropout=1.5 must be in"):
        load_config(CRMConfig, overrides=["dropout=1.5"])


def test_the_cli_options_are_generated_from_every_field() -> None:
    """Each leaf field is an option (a new field gets one with no CLI edit); --help shows the
    dataclass's help and default."""
    code, out = _invoke("train", "rellax", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for leaf in leaf_fields(Stage2Config):
        assert f"--{leaf.path[-1].replace('_', '-')}" in flat, leaf.path
    assert "--bf16" in flat and "--fp32" in flat and "--nproc" in flat and "--force" in flat
    assert "Train stage 1's LoRA A, B too" in flat and "[default: (0.0003)]" in flat


def test_the_cli_resolves_options_overrides_and_files_into_one_config() -> None:
    code, out = _invoke(
        "train", "rellax", "--print-config", "--config", "rellax-one-stage",
        "--lr", "3e-4", "--fp32", "--gate-init", "random", "batch_size=16", "loop.seed=5",
    )  # fmt: skip
    assert code == 0, out
    printed = yaml.safe_load(out[out.index("stage1:") :])
    assert printed["k"] == 5 and printed["train_lora"] is True and printed["gate_init"] == "random"
    assert printed["loop"] == {**printed["loop"], "lr": 3e-4, "batch_size": 16, "seed": 5, "bf16": False}
    # The option beats the override of the same key; crm keeps its historical --epochs alias.
    code, out = _invoke("train", "crm", "--print-config", "--epochs", "2", "max_epochs=5", "hidden=[8, 8]")
    assert code == 0, out
    printed = yaml.safe_load(out[out.index("seed:") :])
    assert printed["max_epochs"] == 2 and printed["hidden"] == [8, 8]
    code, out = _invoke("eval", "--print-config", "n=null", "--dtype", "float32")
    assert code == 0 and yaml.safe_load(out[out.index("split:") :])["n"] is None


def test_bad_cli_settings_exit_2_naming_each_and_train_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    code, out = _invoke(
        "train", "rella", "--out", str(out_dir), "--k", "0", "--prompts", "recency", "lr=fast", "foo=1"
    )
    assert code == 2
    flat = " ".join(out.split())
    for expected in ("k=0 must be > 0", "prompts='recency'", "loop.lr='fast'", "unknown key(s) ['foo']"):
        assert expected in flat, out
    assert not out_dir.exists()
    code, out = _invoke("eval", "--stage2", "rellax")
    assert code == 2 and "is not MODE=DIR" in " ".join(out.split())


def test_every_config_field_has_help() -> None:
    from training.llmsrec.config import RankingConfig

    for cls in (*RECIPES.values(), LoopConfig, ExperimentConfig, RankingConfig, TuneConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_the_tuning_trials_read_the_same_config_and_a_yaml_trial_table(tmp_path: Path) -> None:
    """`rellax experiment tune` is a recipe like the others: options from TuneConfig's fields, its
    trial table printed as YAML blocks that load back as the same trials, and a forked table (one
    trial of the user's own) replaces the built-in one."""
    code, out = _invoke("experiment", "tune", "--print-config", "--budget-min", "5", "--only", "s1-init")
    assert code == 0, out
    printed = out[out.index("results:") :]
    path = tmp_path / "tune.yaml"
    path.write_text(printed)
    cfg = load_config(TuneConfig, path)
    assert cfg.trials == TRIALS and cfg.budget_s == 300.0 and cfg.only == ("s1-init",)
    own = {"name": "mine", "stage": 1, "lr": 3e-4, "batch_size": 8, "target_modules": ["q_proj"]}
    path.write_text(yaml.safe_dump({"trials": [own], "budget_min": 1}))
    mine = load_config(TuneConfig, path)
    assert [t.name for t in mine.trials] == ["mine"] and mine.trials[0].target_modules == ("q_proj",)
    assert mine.trials[0].epochs == 1  # what the file leaves out is the Trial default
    own_over = {"name": "s2", "stage": 2, "over": "nowhere"}
    path.write_text(yaml.safe_dump({"trials": [own, own_over]}))
    code, out = _invoke("experiment", "tune", "--config", str(path), "--only", "bogus", "--budget-min", "-1")
    flat = " ".join(out.split())
    assert code == 2, out
    for expected in ("budget_min=-1.0 must be >= 0", "unknown trials ['bogus']", "s2 trains over 'nowhere'"):
        assert expected in flat, out
