"""CFLoRA: LoRA whose r x r core is produced per sample by a gate on DIN's hidden state (docs/design.md §7).

A `CFLoRALinear` wraps a frozen `nn.Linear` the way peft's LoRA layer does: the base layer stays
untouched under `base_layer`, the adapter is `lora_A`, `lora_B`,
`lora_dropout`, `scaling` = alpha / r, and an optional `gate` hypernetwork. Plain LoRA is the same
class without a gate (G = I), which is how stage-1 A and B (trained with peft) are served.

The per-sample h cannot travel through Hugging Face's Llama forward as an argument, so it reaches
the modules through `gate_context(model, h)`: on entry the G(h) of every layer is computed once,
all layers together (one op per gate stage, not four tiny ops per layer), along with each layer's
M = G·Bᵀ; the decoder runs; on exit the gates are cleared. Per token, a layer then costs one
(d_in x r) GEMM and one accumulating (r x d_out) GEMM on top of W0·x: O(r·(d_in + d_out)), docs/design.md §8.
This is module state: run one forward at a time per model (the service's micro-batcher does).

Merging folds a fixed gate G_bar into the base weight for backends that cannot run per-sample
adapters (vLLM, docs/design.md §8): W = W0 + s·B·G_barᵀ·A. `delta_weight` is the one formula behind the
in-place `merge`/`unmerge` and the pure `merge_cflora_state_dict` used for export.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rellax.spa import SPAProjector

__all__ = [
    "CFLoRALinear",
    "CFLoRAWarning",
    "adapter_params",
    "adapters_disabled",
    "cflora_modules",
    "gate_context",
    "gate_matrices",
    "inject_cflora",
    "load_lora_weights",
    "merge_cflora_state_dict",
    "set_trainable",
]


class CFLoRAWarning(UserWarning):
    """A legal but suspect CFLoRA call, e.g. merging twice (it does nothing)."""


def _delta(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """s·B·Gᵀ·A in fp32 (d_out, d_in); G None is the identity. The one merge formula."""
    A, B = A.float(), B.float()
    core = A if G is None else G.float().T @ A
    return scaling * (B @ core)


class CFLoRALinear(nn.Module):
    """y = W0·x + s·B·G(h)ᵀ·A·dropout(x), with G(h) an r x r matrix per sample.

    Shapes: W0 (d_out, d_in) is `base_layer.weight`, A (r, d_in) is `lora_A.weight`, B (d_out, r) is
    `lora_B.weight`, s = alpha / r. The gate maps h (B, d_h) to G (B, r, r) through
    LayerNorm(d_h) -> Linear(d_h, 2r²) -> GELU -> Linear(2r², r²), reshaped row-major; every token of
    a sample uses its sample's G. Without a gate, G = I and this is exactly peft's LoRA.

    Init: A Kaiming-uniform and B = 0 as in peft (the step-0 model is the base), and the gate's last
    layer has weight 0 and bias vec(I), so G(h) = I for every h at step 0: stage 2 starts exactly at
    the stage-1 model (docs/design.md §7; the authors' code starts from a random G).

    Args:
        base_layer: the frozen linear layer to adapt.
        r: the rank, > 0.
        alpha: the LoRA alpha; scaling = alpha / r.
        dropout: dropout on the adapter's input (training only).
        gate_dim: d_h, the size of h; None for plain LoRA.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        gate_dim: int | None = 256,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be > 0, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if gate_dim is not None and gate_dim <= 0:
            raise ValueError(f"gate_dim must be > 0 or None, got {gate_dim}")
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = None
        if gate_dim is not None:
            self.gate = nn.Sequential(
                nn.LayerNorm(gate_dim, **factory),
                nn.Linear(gate_dim, 2 * r * r, **factory),
                nn.GELU(),
                nn.Linear(2 * r * r, r * r, **factory),
            )
        self.merged_G: torch.Tensor | None = None  # the G folded into base_layer.weight, if merged
        self._G: torch.Tensor | None = None  # set by gate_context: (B, r, r) or (r, r)
        self._M: torch.Tensor | None = None  # set by gate_context with h: G·Bᵀ, (B, r, d_out)
        self._disabled = False  # set by adapters_disabled: the frozen base alone (peft's disable_adapter)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.gate is not None:
            last = self.gate[-1]
            nn.init.zeros_(last.weight)
            with torch.no_grad():
                last.bias.copy_(torch.eye(self.r).flatten())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, gated={self.gate is not None}, merged={self.merged}"

    @property
    def merged(self) -> bool:
        return self.merged_G is not None

    def gate_matrix(self, h: torch.Tensor) -> torch.Tensor | None:
        """G(h): (B, d_h) -> (B, r, r); None (= identity) without a gate."""
        if self.gate is None:
            return None
        return self.gate(h.to(self.gate[0].weight.dtype)).view(-1, self.r, self.r)

    def forward(self, x: torch.Tensor, G: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_out).

        G is (B, r, r) per sample or (r, r) shared; when omitted, the one set by `gate_context` is
        used, and a gated module with neither raises rather than silently running with G = I.
        """
        result = self.base_layer(x)
        if self.merged or self._disabled:
            return result
        M = None
        if G is None:
            G, M = self._G, self._M
            if G is None and self.gate is not None:
                raise RuntimeError("this CFLoRA layer is gated: run the model inside gate_context(model, h)")
        # The adapter may be kept in fp32 over a bf16 base (trainers do, for the optimizer's sake):
        # compute it in its own dtype and add it back in the base's, as peft's LoRA layer does.
        u = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (B, T, r)
        # Fold B·Gᵀ into one small M = G·Bᵀ, (r, d_out) or (B, r, d_out) per sample, so the rest
        # is a single GEMM accumulating into the base output: y = W0·x + s·u·M. Separate bmm /
        # matmul / scale / add passes over (B, T, d_out) cost more than W0·x itself on a CPU.
        # Every extra op is a pass over memory and a thread barrier; s rides along as GEMM alpha.
        if M is None:
            Bt = self.lora_B.weight.t()
            M = Bt if G is None else torch.matmul(G.to(Bt.dtype), Bt)
        u, M, s = u.to(result.dtype), M.to(result.dtype), self.scaling
        in_place = not torch.is_grad_enabled()  # result is ours and nothing saved it for backward
        if M.dim() == 3:
            if result.dim() != 3 or M.shape[0] != result.shape[0]:
                raise ValueError(f"G holds {M.shape[0]} samples, the input batch is {tuple(x.shape)[:-2]}")
            return result.baddbmm_(u, M, alpha=s) if in_place else torch.baddbmm(result, u, M, alpha=s)
        flat, u = result.view(-1, result.shape[-1]), u.reshape(-1, self.r)
        return (flat.addmm_(u, M, alpha=s) if in_place else torch.addmm(flat, u, M, alpha=s)).view(
            result.shape
        )

    def delta_weight(self, G: torch.Tensor | None = None) -> torch.Tensor:
        """s·B·Gᵀ·A as a (d_out, d_in) fp32 tensor for one fixed G (r, r); None means G = I."""
        if G is not None and G.shape != (self.r, self.r):
            raise ValueError(f"G must be ({self.r}, {self.r}) to merge, got {tuple(G.shape)}")
        return _delta(self.lora_A.weight, self.lora_B.weight, G, self.scaling)

    @torch.no_grad()
    def merge(self, G_bar: torch.Tensor | None = None, safe: bool = True) -> None:
        """W0 += s·B·G_barᵀ·A in place. A gated layer needs G_bar; plain LoRA uses G = I.

        With `safe`, the sum is built aside and checked finite first: a bad adapter raises and the
        base weight stays bit-identical. A second merge warns and does nothing.
        """
        if self.merged:
            warnings.warn("already merged; unmerge() first to merge another G", CFLoRAWarning, stacklevel=2)
            return
        if G_bar is None and self.gate is not None:
            raise ValueError("a gated CFLoRA layer needs G_bar to merge (e.g. the mean gate over training)")
        G = torch.eye(self.r) if G_bar is None else G_bar.detach().float().cpu()
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight(G.to(weight.device))
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merging would write non-finite values into the base weight; nothing merged")
        weight.copy_(merged.to(weight.dtype))
        self.merged_G = G

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= the merged delta. Without a merge it warns and does nothing."""
        if not self.merged:
            warnings.warn("nothing merged; unmerge() does nothing", CFLoRAWarning, stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight(self.merged_G.to(weight.device))).to(weight.dtype))
        self.merged_G = None


def cflora_modules(model: nn.Module) -> dict[str, CFLoRALinear]:
    """Every CFLoRA layer of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CFLoRALinear)}


def inject_cflora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    gate_dim: int | None = 256,
) -> list[str]:
    """Wrap every `nn.Linear` whose last name part is in `target_modules`; return their names."""
    if cflora_modules(model):
        raise ValueError("model already has CFLoRA layers")
    targets = set(target_modules)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets
    ]
    if not names:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in {type(model).__name__}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, CFLoRALinear(getattr(owner, child), r, alpha, dropout, gate_dim))
    return names


@contextlib.contextmanager
def gate_context(
    model: nn.Module, h: torch.Tensor | None = None, *, fixed: Mapping[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Make every CFLoRA layer of `model` use G(h) per sample, or fixed G's, inside the block.

    Args:
        model: a model with CFLoRA layers.
        h: (B, d_h) DIN hidden states, one per sample of the batch run inside the block.
        fixed: instead of h, one (r, r) G per layer name (e.g. G_bar from `gate_matrices`), to run
            the exact path as a merged model would.
    """
    if (h is None) == (fixed is None):
        raise ValueError("pass exactly one of h or fixed")
    modules = cflora_modules(model)
    previous = {name: (m._G, m._M) for name, m in modules.items()}
    try:
        if h is not None:
            gated = [m for m in modules.values() if m.gate is not None]
            gates = _gates_at_once(gated, h)
            for m, G, M in zip(gated, gates, _cores_at_once(gated, gates), strict=True):
                m._G, m._M = G, M
        else:
            for name, m in modules.items():
                if name not in fixed:
                    raise KeyError(f"no fixed G for CFLoRA layer {name!r}")
                m._G, m._M = fixed[name], None
        yield
    finally:
        for name, m in modules.items():
            m._G, m._M = previous[name]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its frozen base inside the block (as peft's `disable_adapter`): LLM-SRec reads
    the base SmolLM2 the bundle already holds, so the service keeps one copy of the weights."""
    modules = list(cflora_modules(model).values())
    if any(m.merged for m in modules):
        raise ValueError("a merged CFLoRA layer cannot be disabled: its delta is in the base weight")
    try:
        for m in modules:
            m._disabled = True
        yield
    finally:
        for m in modules:
            m._disabled = False


def gate_matrices(model: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """G(h) (B, r, r) of every gated CFLoRA layer, by name: average these over training for G_bar."""
    gated = {name: m for name, m in cflora_modules(model).items() if m.gate is not None}
    return dict(zip(gated, _gates_at_once(list(gated.values()), h), strict=True))


def _groups(layers: list[CFLoRALinear], key) -> list[list[int]]:  # noqa: ANN001
    groups: dict[object, list[int]] = {}
    for i, m in enumerate(layers):
        groups.setdefault(key(m), []).append(i)
    return list(groups.values())


def _gates_at_once(layers: list[CFLoRALinear], h: torch.Tensor) -> list[torch.Tensor]:
    """G(h) (B, r, r) for many gated layers with one op per gate stage for all of them.

    Same result as each layer's `gate_matrix(h)`, but ~10 ops instead of 4 per layer: on a CPU
    every op is a thread barrier, and 60 layers x 4 tiny MLP ops cost more than their arithmetic.
    The affine-free part of LayerNorm is the same for every layer, so it runs once.
    """
    out: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def key(m: CFLoRALinear) -> tuple:
        ln, fc1, act = m.gate[0], m.gate[1], m.gate[2]
        return (
            m.r,
            fc1.in_features,
            fc1.out_features,
            ln.eps,
            act.approximate,
            fc1.weight.dtype,
            fc1.weight.device,
        )

    for idx in _groups(layers, key):
        group = [layers[i] for i in idx]
        ln, act, r = group[0].gate[0], group[0].gate[2], group[0].r

        def stacked(stage: int, attr: str, group: list[CFLoRALinear] = group) -> torch.Tensor:
            return torch.stack([getattr(m.gate[stage], attr) for m in group])

        x = F.layer_norm(h.to(ln.weight.dtype), ln.normalized_shape, eps=ln.eps)  # (B, d_h)
        x = torch.addcmul(stacked(0, "bias")[:, None], x[None], stacked(0, "weight")[:, None])  # (n, B, d_h)
        x = torch.baddbmm(stacked(1, "bias")[:, None], x, stacked(1, "weight").transpose(1, 2))
        x = torch.baddbmm(stacked(3, "bias")[:, None], F.gelu(x, approximate=act.approximate),
                          stacked(3, "weight").transpose(1, 2))  # fmt: skip
        G = x.view(len(group), -1, r, r)
        for j, i in enumerate(idx):
            out[i] = G[j]
    return out


def _cores_at_once(layers: list[CFLoRALinear], gates: list[torch.Tensor]) -> list[torch.Tensor]:
    """M = G·Bᵀ (B, r, d_out) per layer, one matmul per group of same-shaped layers."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    for idx in _groups(layers, lambda m: (m.r, m.lora_B.weight.shape, m.lora_B.weight.dtype)):
        Bt = torch.stack([layers[i].lora_B.weight for i in idx]).transpose(1, 2)[:, None]  # (n, 1, r, d_out)
        G = torch.stack([gates[i] for i in idx]).to(Bt.dtype)  # (n, B, r, r)
        M = torch.matmul(G, Bt)
        for j, i in enumerate(idx):
            out[i] = M[j]
    return out


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)


def load_lora_weights(model: nn.Module, peft_state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy A and B of a peft LoRA (one adapter) into `model`'s CFLoRA layers; return the layer names.

    Accepts `get_peft_model_state_dict(...)` keys (`...q_proj.lora_A.weight`) and full peft model keys
    (`...q_proj.lora_A.default.weight`). Every CFLoRA layer must receive both A and B with matching
    shapes. peft's scaling is not in its state dict: inject with the same r and alpha.
    """
    modules = cflora_modules(model)
    loaded: dict[tuple[str, str], torch.Tensor] = {}
    adapters = set()
    for key, value in peft_state_dict.items():
        if not (match := _PEFT_KEY.match(key)):
            continue
        adapters.add(match["adapter"])
        owners = [n for n in modules if n == match["module"] or n.endswith("." + match["module"])]
        if len(owners) != 1:
            raise ValueError(f"peft key {key!r} matches {len(owners)} CFLoRA layers, expected 1")
        loaded[owners[0], match["part"]] = value
    if len(adapters) > 1:
        raise ValueError(f"the state dict holds several adapters {sorted(map(str, adapters))}; pass one")
    missing = [f"{n}.{p}" for n in modules for p in ("lora_A", "lora_B") if (n, p) not in loaded]
    if missing:
        raise ValueError(f"peft state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for (name, part), value in loaded.items():
            target = getattr(modules[name], part).weight
            if target.shape != value.shape:
                raise ValueError(
                    f"{name}.{part}: shape {tuple(value.shape)} != {tuple(target.shape)} (same r?)"
                )
            target.copy_(value)
    return sorted(modules)


def adapter_params(model: nn.Module, stage: Literal["lora", "gates", "spa"]) -> dict[str, nn.Parameter]:
    """The parameters a training stage owns, by name (as peft marks a method's own).

    "lora": every A and B (stage 1); "gates": every gate hypernetwork; "spa": every SPA projector.
    Stage 2 trains the union of "gates" and "spa" (or one of them in the ablations).
    """
    if stage == "lora":
        owners = {
            f"{n}.{p}": getattr(m, p) for n, m in cflora_modules(model).items() for p in ("lora_A", "lora_B")
        }
    elif stage == "gates":
        owners = {f"{n}.gate": m.gate for n, m in cflora_modules(model).items() if m.gate is not None}
    elif stage == "spa":
        owners = {n: m for n, m in model.named_modules() if isinstance(m, SPAProjector)}
    else:
        raise ValueError(f"stage must be 'lora', 'gates' or 'spa', got {stage!r}")
    return {
        f"{prefix}.{name}".lstrip("."): p
        for prefix, owner in owners.items()
        for name, p in owner.named_parameters()
    }


def set_trainable(model: nn.Module, names: Iterable[str]) -> None:
    """requires_grad = True exactly for the named parameters of `model`, False for all others."""
    wanted = set(names)
    params = dict(model.named_parameters())
    if unknown := sorted(wanted - params.keys()):
        raise ValueError(f"unknown parameter name(s): {unknown[:5]}")
    for name, p in params.items():
        p.requires_grad_(name in wanted)


def merge_cflora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    g_bars: Mapping[str, torch.Tensor] | None,
    scaling: float,
) -> dict[str, torch.Tensor]:
    """A plain checkpoint with W = W0 + s·B·G_barᵀ·A in every CFLoRA layer (pure; docs/design.md §8).

    `state_dict` is a CFLoRA model's; `g_bars` maps each layer name (the prefix of its `lora_A`
    key) to its (r, r) G_bar, None meaning G = I everywhere (plain LoRA). The result has the keys of
    the model before injection (`...q_proj.weight`), so a stock Hugging Face model loads it.
    """
    layers = [k.removesuffix(".lora_A.weight") for k in state_dict if k.endswith(".lora_A.weight")]
    out = {k: v for k, v in state_dict.items() if not any(k.startswith(f"{layer}.") for layer in layers)}
    for layer in layers:
        base = state_dict[f"{layer}.base_layer.weight"]
        G = g_bars.get(layer) if g_bars is not None else None
        if G is None and any(k.startswith(f"{layer}.gate.") for k in state_dict):
            raise KeyError(f"no G_bar for gated CFLoRA layer {layer!r}")
        delta = _delta(state_dict[f"{layer}.lora_A.weight"], state_dict[f"{layer}.lora_B.weight"], G, scaling)
        weight = base.float() + delta
        if not torch.isfinite(weight).all():
            raise ValueError(f"merged weight of {layer!r} is not finite")
        out[f"{layer}.weight"] = weight.to(base.dtype)
        if (bias := state_dict.get(f"{layer}.base_layer.bias")) is not None:
            out[f"{layer}.bias"] = bias
    return out
