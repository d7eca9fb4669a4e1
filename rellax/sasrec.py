"""SASRec (Kang & McAuley, 2018): the collaborative teacher of LLM-SRec (docs/design.md §11).

A causal Transformer over a user's item sequence: 64-d item + learned position embeddings, 2 blocks,
1 head, dropout 0.1, sequences of at most 128 items. The output at position t represents the user
after the first t+1 items; its dot product with an item embedding scores that item as the next one.
The user vector LLM-SRec distils is the output at the last position.

Sequences are left-padded with row 0 (padding, and any unknown item), so the last position is always
the newest item. As in the authors' code, padded positions are zeroed after every block (the
"timeline mask") instead of being masked as keys: a causal mask plus a key mask leaves the leading
padded rows with nothing to attend to (NaN), while zeroed rows only add a little uniform attention
mass, which the model learns around. Items keep an explicit id -> row map (`items`), saved with the
weights, so serving embeds the same rows training did.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rellax.errors import BundleError

__all__ = ["SASRec", "SASRecConfig"]

WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE = "sasrec.safetensors", "sasrec.json", "sasrec_items.json"


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int  # item rows, padding (row 0) excluded
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.1
    max_len: int = 128


class SASRec(nn.Module):
    """Item sequence -> one vector per position; `user_vector` is the last one."""

    def __init__(self, config: SASRecConfig, items: dict[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.items = items or {}
        d = config.dim
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, config.heads, dim_feedforward=d, dropout=config.dropout, batch_first=True, norm_first=True
            )
            for _ in range(config.blocks)
        )
        self.norm = nn.LayerNorm(d)
        causal = torch.triu(torch.ones(config.max_len, config.max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def rows(self, item_ids: Sequence[int]) -> list[int]:
        """Embedding rows of raw item ids; an item training never saw maps to 0 (padding)."""
        return [self.items.get(int(i), 0) for i in item_ids]

    def encode(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, max_len) left-padded row tensor of raw-id histories, keeping each one's newest items."""
        out = torch.zeros(len(histories), self.config.max_len, dtype=torch.long)
        for b, hist in enumerate(histories):
            rows = self.rows(list(hist)[-self.config.max_len :])
            if rows:
                out[b, -len(rows) :] = torch.tensor(rows)
        return out.to(self.item_emb.weight.device)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) item rows, left-padded with 0 -> (B, L, dim) outputs (zero at padded positions)."""
        length = seq.shape[1]
        keep = (seq != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        pos = torch.arange(length, device=seq.device).unsqueeze(0)
        x = self.item_emb(seq) * self.config.dim**0.5 + self.pos_emb(pos)
        x = self.drop(x) * keep
        mask = self.causal[:length, :length]
        for layer in self.layers:
            x = layer(x, src_mask=mask) * keep
        return self.norm(x) * keep

    def user_vector(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, dim): the output after the newest item."""
        return self.forward(seq)[:, -1]

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self.item_emb(rows)

    def save(self, folder: Path | str) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt", "model": "SASRec"})
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        (folder / ITEMS_FILE).write_text(json.dumps({str(k): v for k, v in self.items.items()}))

    @classmethod
    def load(cls, folder: Path | str) -> SASRec:
        """A saved model in eval mode; BundleError naming a missing file."""
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE) if not (folder / n).exists()]
        if missing:
            raise BundleError(f"{folder}: SASRec file(s) missing: {missing}")
        config = SASRecConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        items = {int(k): int(v) for k, v in json.loads((folder / ITEMS_FILE).read_text()).items()}
        model = cls(config, items)
        model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return model.eval()

    @staticmethod
    def item_map(item_ids: np.ndarray) -> dict[int, int]:
        """Rows 1..n for the sorted distinct ids (row 0 is padding / unknown)."""
        return {int(i): r for r, i in enumerate(np.unique(item_ids), start=1)}
