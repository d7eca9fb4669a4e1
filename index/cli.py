"""`rellax index ...`: build the item index. Heavy imports (torch, transformers, training) stay inside
the command so `rellax --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]

index_app = typer.Typer(help="Item embeddings, the hnswlib item index and SUBR.", no_args_is_help=True)


@index_app.command("build")
def build(
    model_dir: Annotated[
        Path | None, typer.Option(help="Hugging Face causal-LM dir [default: the prepared SmolLM2]")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder [default: <cache>/index/<data set>, the LLM's name]")
    ] = None,
    dim: Annotated[int, typer.Option(help="PCA dimensions (capped at the model's hidden size).")] = 512,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the PCA and the hnsw graph.")] = 0,
) -> None:
    """Embed every catalogue item with the scoring LLM, PCA, L2-normalise, and save the hnswlib index."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.loading import default_index_dir, load_dataset
    from index.build import build_item_index
    from index.embed import resolve_dtype
    from rellax.assets import prepare_model
    from rellax.device import resolve_device

    given = model_dir
    model_dir = prepare_model(source=model_dir)
    out = out or default_index_dir(given)
    data, _, manifest = load_dataset()
    items = data.item_records()
    device = resolve_device()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = resolve_dtype(device, None)
    typer.echo(f"embedding {len(items)} items with {model_dir.name} on {device} "
               f"({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads)")  # fmt: skip
    started = time.perf_counter()
    index = build_item_index(
        model, tokenizer, items, dim=dim, batch_size=batch_size, seed=seed, domain=data.domain
    )
    index.meta["data"] = {k: manifest.get(k) for k in ("source_hash", "dataset", "dataset_key")}
    seconds = time.perf_counter() - started
    index.meta["model_dir"] = str(model_dir)
    checksums = index.save(out)
    embed_s = index.meta["embed_seconds"]
    typer.echo(
        f"item index: {len(index)} items, {index.meta['hidden_size']} -> {index.dim} dims "
        f"(PCA keeps {index.meta['pca_explained_variance']:.1%} of the variance), "
        f"built in {seconds:.1f} s (embedding {embed_s:.1f} s, {len(index) / embed_s:.1f} items/s)"
    )
    typer.echo(f"saved to {out}:")
    for name, digest in checksums.items():
        typer.echo(f"  {name:22s} {(out / name).stat().st_size / 1e6:8.2f} MB  sha256 {digest[:16]}")


def register(app: typer.Typer) -> None:
    """Add the `index` command group to the `rellax` app."""
    app.add_typer(index_app, name="index")
