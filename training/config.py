"""One typed config per recipe, and the CLI generated from it (docs/design.md §2).

A recipe's config is a dataclass whose fields carry their help (`setting`), as peft's configs do.
The defaults are declared there, once; `training/configs/<recipe>.yaml` is the same config written
out with its comments (`dump_yaml`, kept in step by a test) for a user to read and fork, and other
YAML files there are named variants that set only what they change. A run's settings come from, in
order: the typed defaults, a YAML file (`--config`), `key=value` overrides (dotted for nested
fields, `loop.lr=3e-4`, or by the leaf's own name, `lr=3e-4`), then the command's options, which
`with_config` generates from the same fields. pydantic validates the result; every problem (an
unknown key, a value of the wrong type, a value the recipe's `problems()` refuses) is reported at
start-up, at once, naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml

__all__ = [
    "CONFIG_DIR",
    "artefact",
    "ConfigError",
    "dump_yaml",
    "leaf_fields",
    "load_config",
    "not_positive",
    "setting",
    "with_config",
]

T = TypeVar("T")
CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A recipe config that cannot run; `problems` lists every reason, each naming its key."""

    def __init__(self, name: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"invalid {name} config: " + "; ".join(self.problems))


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002 - the word every CLI library uses
    factory: Callable[[], Any] | None = None,
    flag: str | tuple[str, ...] | None = None,
    cli: bool = True,
) -> Any:
    """A config field with its help text (shown by `--help` and written into the YAML).

    `flag` replaces the generated option declaration (e.g. "--bf16/--fp32"); `cli=False` leaves the
    field to YAML and overrides only (a command adds its own option for it)."""
    metadata = {"help": help, "flag": flag, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def not_positive(cfg: Any, *names: str) -> list[str]:
    """The `problems()` line for each named field that is not > 0, in the order named."""
    return [f"{n}={getattr(cfg, n)!r} must be > 0" for n in names if getattr(cfg, n) <= 0]


def artefact(kind: str, name: str, *parts: str) -> Callable[[], Path]:
    """A `factory=` for a folder under the data set's artefacts (`data.loading.artefact_dir`), built
    only when a default is needed: the data layer imports pandas, `rellax --help` should not."""

    def build() -> Path:
        from data.loading import artefact_dir

        return artefact_dir(kind, name).joinpath(*parts)

    return build


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One non-dataclass field of a (nested) config: where it sits and what it holds."""

    path: tuple[str, ...]
    hint: Any
    field: dataclasses.Field


def leaf_fields(cls: type) -> list[Leaf]:
    """Every leaf field of a config class, nested dataclasses flattened (`loop.lr` -> path (loop, lr))."""
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += [Leaf((f.name, *leaf.path), leaf.hint, leaf.field) for leaf in leaf_fields(hint)]
        else:
            out.append(Leaf((f.name,), hint, f))
    return out


def load_config(
    cls: type[T],
    path: Path | str | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> T:
    """The config a run uses: typed defaults <- YAML file <- `key=value` overrides <- `values`
    (dotted or leaf-name keys, None meaning "not given"). Raises ConfigError listing every problem."""
    from pydantic import TypeAdapter, ValidationError

    name = cls.__name__
    problems: list[str] = []
    aliases, nested = _aliases(cls), _nested_paths(cls)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            found = yaml.safe_load(resolve_config_path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(name, [f"{path}: not YAML ({exc})"]) from None
        if not isinstance(found, dict):
            raise ConfigError(name, [f"{path}: a YAML mapping of settings is needed"])
        for key, value in _flatten(found, nested):
            _put(raw, aliases.get(key, key), value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not key=value")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _put(raw, aliases.get(key.strip(), key.strip()), value)
    for key, value in (values or {}).items():
        if value is not None:
            _put(raw, aliases.get(key, key), list(value) if isinstance(value, tuple) else value)
    known = {".".join(leaf.path) for leaf in leaf_fields(cls)}
    unknown = sorted(k for k, _ in _flatten(raw, nested) if k not in known)
    if unknown:
        problems.append(f"unknown key(s) {unknown}; known: {sorted(known)}")
        for key in unknown:
            _drop(raw, key)
    adapter = TypeAdapter(cls)
    try:
        cfg = adapter.validate_python(raw)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"{key}={err.get('input')!r}: {err['msg']}")
            _drop(raw, key)
        # The rest may still break one of the recipe's rules: say so now, not on the next try.
        with contextlib.suppress(ValidationError):
            problems += _problems(adapter.validate_python(raw))
        raise ConfigError(name, problems) from None
    problems += _problems(cfg)
    if problems:
        raise ConfigError(name, problems)
    return cfg


def resolve_config_path(path: Path | str) -> Path:
    """A YAML path, or the name of one shipped in training/configs/ ("rella-paper")."""
    given = Path(path)
    if given.exists():
        return given
    shipped = CONFIG_DIR / f"{given.name.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError("recipe", [f"--config {path}: no such file, nor a shipped config {names}"])


def dump_yaml(cfg: Any, header: str = "", portable: bool = False) -> str:
    """The config as commented YAML (one line a field, its help as the comment): what
    `--print-config` prints for a user to fork. `portable` (the shipped defaults files) writes
    paths under the cache as $RELLAX_CACHE_DIR/... and comments those lines out, so the file holds
    no machine's paths and loading it keeps each such default."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += _yaml_lines(cfg, indent="", portable=portable)
    return "\n".join(lines) + "\n"


def _yaml_lines(cfg: Any, indent: str, portable: bool) -> list[str]:
    from rellax.paths import cache_dir

    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines += _yaml_lines(value, indent + "  ", portable)
            continue
        comment = f"  # {f.metadata['help']}" if f.metadata.get("help") else ""
        if portable and isinstance(value, Path) and value.is_relative_to(cache_dir()):
            shown = "$RELLAX_CACHE_DIR/" + str(value.relative_to(cache_dir()))
            lines.append(f"{indent}# {f.name}: {shown}{comment}")
            continue
        plain = _plain(value)
        if isinstance(plain, list) and plain and all(isinstance(v, dict) for v in plain):
            # A table of records (the tuning trials): one block per record, readable and forkable.
            block = yaml.safe_dump(plain, default_flow_style=None, sort_keys=False, width=100)
            lines += [f"{indent}{f.name}:{comment}", *(f"{indent}  {line}" for line in block.splitlines())]
            continue
        text = yaml.safe_dump(plain, default_flow_style=True, width=1000).strip()
        text = text.removesuffix("...").strip()
        lines.append(f"{indent}{f.name}: {text}{comment}")
    return lines


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. one tuning trial
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _problems(cfg: Any) -> list[str]:
    """Every `problems()` of the config and its nested configs, keys prefixed with their path."""
    found = list(cfg.problems()) if hasattr(cfg, "problems") else []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            found += [f"{f.name}.{p}" for p in _problems(value)]
    return found


def _aliases(cls: type) -> dict[str, str]:
    """Leaf name -> dotted key, for nested leaves whose name is unique (`lr` -> `loop.lr`)."""
    leaves = leaf_fields(cls)
    counts: dict[str, int] = {}
    for leaf in leaves:
        counts[leaf.path[-1]] = counts.get(leaf.path[-1], 0) + 1
    return {
        leaf.path[-1]: ".".join(leaf.path)
        for leaf in leaves
        if len(leaf.path) > 1 and counts[leaf.path[-1]] == 1
    }


def _nested_paths(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of a config's nested config fields (`loop`)."""
    hints = typing.get_type_hints(cls)
    found: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= {prefix + f.name, *_nested_paths(hints[f.name], f"{prefix}{f.name}.")}
    return found


def _flatten(d: Mapping[str, Any], nested: set[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) pairs, descending only into the config's nested configs."""
    for key, value in d.items():
        if f"{prefix}{key}" in nested and isinstance(value, dict):
            yield from _flatten(value, nested, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[last] = value


def _drop(raw: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part, {})
    if isinstance(node, dict):
        node.pop(last, None)


# --- the shipped files -----------------------------------------------------------------------------


def recipes() -> dict[str, type]:
    """Recipe name (its command and its defaults file) -> config class."""
    from training.crm.config import CRMConfig
    from training.llm.config import EvalConfig, Stage1Config, Stage2Config
    from training.llmsrec.config import LLMSRecConfig, SASRecTrainConfig

    return {
        "crm": CRMConfig,
        "rella": Stage1Config,
        "rellax": Stage2Config,
        "eval": EvalConfig,
        "sasrec": SASRecTrainConfig,
        "llmsrec": LLMSRecConfig,
    }


def defaults_yaml(recipe: str) -> str:
    """What training/configs/<recipe>.yaml holds: the typed defaults, written out with their help."""
    cls = recipes()[recipe]
    command = f"rellax {recipe}" if recipe == "eval" else f"rellax train {recipe}"
    cfg = cls()
    header = (
        f"Defaults of `{command}` ({cls.__module__}.{cls.__name__}); `python -m training.config` writes it.\n"
        f"Copy, edit, then `{command} --config FILE`; `key=value` and the options override a file."
    )
    if "\n# " in dump_yaml(cfg, portable=True):
        header += "\nCommented lines are folders under the cache, kept as defaults."
    return dump_yaml(cfg, header, portable=True)


def write_defaults() -> None:
    """Rewrite every recipe's defaults file (after a config's fields change; a test checks it)."""
    for recipe in recipes():
        (CONFIG_DIR / f"{recipe}.yaml").write_text(defaults_yaml(recipe))


# --- the generated CLI ----------------------------------------------------------------------------


def _option_type(hint: Any) -> tuple[Any, str]:
    """(the type typer parses, a note on allowed values) for a field's type hint."""
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if get_origin(base) is Literal:
        return str, " One of: " + ", ".join(map(str, get_args(base))) + "."
    if get_origin(base) in (tuple, list):
        inner = get_args(base)[0]
        return list[inner], " Repeat the option for several."
    if base in (int, float, str, bool, Path):
        return base, ""
    raise TypeError(f"no CLI option for a field of type {hint!r}")


def _options(cls: type) -> list[tuple[inspect.Parameter, Leaf]]:
    import typer

    params = []
    for leaf in leaf_fields(cls):
        meta = leaf.field.metadata
        if not meta.get("cli", True):
            continue
        kind, note = _option_type(leaf.hint)
        leaf_name = leaf.path[-1]
        flag = meta.get("flag")
        decls = (flag,) if isinstance(flag, str) else flag
        name = leaf_name.replace("_", "-")
        decls = decls or ((f"--{name}/--no-{name}",) if kind is bool else (f"--{name}",))
        default = _default_of(cls, leaf.path)
        if default is _COMPUTED:
            shown: bool | str = False  # a default the help describes (a folder under the cache)
        elif default is None:
            shown = "none"
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        option = typer.Option(*decls, help=(meta.get("help") or "") + note, show_default=shown)
        param = inspect.Parameter(
            "cfg__" + "__".join(leaf.path),
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[kind | None, option],
        )
        params.append((param, leaf))
    return params


_COMPUTED = object()


def _default_of(cls: type, path: tuple[str, ...]) -> Any:
    """A field's default for `--help`, without building top-level factories (they may read the
    environment or import pandas); nested configs' factories are plain and are built."""
    f = next(f for f in dataclasses.fields(cls) if f.name == path[0])
    if len(path) == 1:
        return _COMPUTED if f.default is dataclasses.MISSING else f.default
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    for part in path[1:]:
        value = getattr(value, part)
    return value


def with_config(
    cls: type, *, recipe: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn `command(cfg, **own_options)` into a typer command whose options are the config's fields
    (flattened, each with its help and default) plus `--config FILE`, `--print-config` and trailing
    `key=value` overrides. The command gets the validated config; bad settings exit 2, naming each."""
    import typer

    generated = _options(cls)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for name, p in inspect.signature(command).parameters.items() if name != "cfg"]
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        extra = [
            inspect.Parameter(
                "overrides",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None,
                annotation=Annotated[
                    list[str] | None,
                    typer.Argument(help="Config overrides as key=value (YAML values; loop.lr or lr)."),
                ],
            ),
            inspect.Parameter(
                "config_file",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    Path | None,
                    typer.Option(
                        "--config",
                        help=f"YAML settings, or a shipped file by name (training/configs/{recipe}*.yaml)."
                        if recipe
                        else "YAML settings.",
                    ),
                ],
            ),
            inspect.Parameter(
                "print_config",
                inspect.Parameter.KEYWORD_ONLY,
                default=False,
                annotation=Annotated[
                    bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.")
                ],
            ),
        ]
        # One positional argument (the overrides); everything else is an option.
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params = [extra[0], extra[1], extra[2], *keyword, *(p for p, _ in generated)]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {".".join(leaf.path): kwargs.pop(p.name) for p, leaf in generated}
            overrides = kwargs.pop("overrides") or []
            config_file = kwargs.pop("config_file")
            print_config = kwargs.pop("print_config")
            try:
                cfg = load_config(cls, config_file, overrides, values)
            except ConfigError as exc:
                raise typer.BadParameter("\n  - " + "\n  - ".join(exc.problems)) from None
            if print_config:
                typer.echo(dump_yaml(cfg), nl=False)
                raise typer.Exit(0)
            return command(cfg, **kwargs)

        del run.__wrapped__  # typer must read the generated signature, not the command's
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


if __name__ == "__main__":
    write_defaults()
