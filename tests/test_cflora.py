"""CFLoRA against peft's LoRA, merging, gates, trainable sets and the export merge (fp32, 1e-6)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import LlamaForCausalLM

from rellax.cflora import (
    CFLoRALinear,
    CFLoRAWarning,
    adapter_params,
    cflora_modules,
    gate_context,
    gate_matrices,
    inject_cflora,
    load_lora_weights,
    merge_cflora_state_dict,
    set_trainable,
)
from rellax.scorer import ScoringModel
from rellax.spa import SPAProjector

GATE_DIM = 16
ATOL = 1e-6


@pytest.fixture()
def input_ids() -> torch.Tensor:
    return torch.randint(20, 5000, (2, 11), generator=torch.Generator().manual_seed(1))


def _randomize(model: torch.nn.Module, gates: bool = True) -> None:
    """Non-trivial adapters: B != 0 (else every check passes vacuously) and, optionally, G != I."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in cflora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
            if gates and m.gate is not None:
                for p in m.gate.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("gate_dim", [None, GATE_DIM])
def test_identity_gate_equals_peft_lora(tiny_llama, input_ids, gate_dim) -> None:  # noqa: ANN001
    peft_model = get_peft_model(
        copy.deepcopy(tiny_llama),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    ).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter matter
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    ours = copy.deepcopy(tiny_llama)
    names = inject_cflora(ours, r=8, alpha=16, dropout=0.0, gate_dim=gate_dim)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert load_lora_weights(ours, get_peft_model_state_dict(peft_model)) == sorted(names)
    expected = _logits(peft_model, input_ids)
    assert not torch.allclose(
        expected, _logits(tiny_llama, input_ids), atol=1e-3
    )  # the adapter changes things
    if gate_dim is None:
        got = _logits(ours, input_ids)
    else:
        with gate_context(ours, torch.randn(2, gate_dim)):  # G(h) = I at init, whatever h is
            got = _logits(ours, input_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the full peft model state dict (adapter name inside the keys) loads the same
    again = copy.deepcopy(tiny_llama)
    inject_cflora(again, dropout=0.0, gate_dim=None)
    load_lora_weights(again, peft_model.state_dict())
    torch.testing.assert_close(_logits(again, input_ids), expected, atol=ATOL, rtol=0)


def test_gate_init_is_exactly_identity() -> None:
    layer = CFLoRALinear(torch.nn.Linear(32, 24), r=4, gate_dim=GATE_DIM)
    G = layer.gate_matrix(torch.randn(5, GATE_DIM) * 10)
    assert G.shape == (5, 4, 4)
    assert torch.equal(G, torch.eye(4).expand(5, 4, 4))


def test_zero_b_gives_the_base_model(tiny_llama, input_ids) -> None:  # noqa: ANN001
    base = _logits(tiny_llama, input_ids)
    model = copy.deepcopy(tiny_llama)
    inject_cflora(model, dropout=0.0, gate_dim=GATE_DIM)
    _randomize(model)
    with torch.no_grad():
        for m in cflora_modules(model).values():
            m.lora_B.weight.zero_()
    with gate_context(model, torch.randn(2, GATE_DIM)):
        torch.testing.assert_close(_logits(model, input_ids), base, atol=ATOL, rtol=0)


def test_gated_layer_without_context_raises(tiny_llama, input_ids) -> None:  # noqa: ANN001
    inject_cflora(tiny_llama, gate_dim=GATE_DIM)
    with pytest.raises(RuntimeError, match="gate_context"):
        _logits(tiny_llama, input_ids)
    with pytest.raises(ValueError, match="batch"), gate_context(tiny_llama, torch.randn(3, GATE_DIM)):
        _logits(tiny_llama, input_ids)


def test_merge_constant_g_equals_unmerged_then_unmerge_restores(tiny_llama, input_ids) -> None:  # noqa: ANN001
    model = copy.deepcopy(tiny_llama)
    inject_cflora(model, dropout=0.0, gate_dim=GATE_DIM)
    _randomize(model)
    g = torch.Generator().manual_seed(5)
    fixed = {name: torch.randn(8, 8, generator=g) for name in cflora_modules(model)}
    with gate_context(model, fixed=fixed):
        unmerged = _logits(model, input_ids)
    originals = {n: m.base_layer.weight.clone() for n, m in cflora_modules(model).items()}
    for name, m in cflora_modules(model).items():
        m.merge(fixed[name])
    # merged layers ignore the gate path: no context needed, and W0 + s·B·Gᵀ·A gives the same logits
    torch.testing.assert_close(_logits(model, input_ids), unmerged, atol=ATOL, rtol=0)
    layer = cflora_modules(model)[next(iter(fixed))]
    merged_weight = layer.base_layer.weight.clone()
    with pytest.warns(CFLoRAWarning, match="already merged"):
        layer.merge(torch.eye(8))
    assert torch.equal(layer.base_layer.weight, merged_weight)
    for m in cflora_modules(model).values():
        m.unmerge()
    for name, m in cflora_modules(model).items():
        torch.testing.assert_close(m.base_layer.weight, originals[name], atol=ATOL, rtol=0)
    with pytest.warns(CFLoRAWarning, match="nothing merged"):
        layer.unmerge()
    with pytest.raises(ValueError, match="G_bar"):
        layer.merge()  # a gated layer has no natural G to merge


def test_safe_merge_of_nan_raises_and_leaves_base_bit_identical() -> None:
    layer = CFLoRALinear(torch.nn.Linear(32, 24), r=4, gate_dim=None)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_two_samples_with_different_h_equal_each_alone(tiny_llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(tiny_llama)
    inject_cflora(model, dropout=0.0, gate_dim=GATE_DIM)
    _randomize(model)
    ids = torch.randint(20, 5000, (2, 9), generator=torch.Generator().manual_seed(2))
    h = torch.randn(2, GATE_DIM, generator=torch.Generator().manual_seed(4))
    G = gate_matrices(model, h)
    assert all(not torch.allclose(g[0], g[1]) for g in G.values())  # the gates really differ per sample
    with gate_context(model, h):
        both = _logits(model, ids)
    for i in range(2):
        with gate_context(model, h[i : i + 1]):
            alone = _logits(model, ids[i : i + 1])
        # 1e-5, not 1e-6: the GEMM kernels block differently for batch 1 and 2, which moves even the
        # base model's logits by ~3e-7; the randomised adapters here scale activations up ~10x.
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=0)
    with gate_context(model, h[[1, 1]]):  # and h matters: sample 0 with sample 1's gate differs
        swapped = _logits(model, ids)
    assert not torch.allclose(swapped[0], both[0], atol=1e-3)


def test_adapter_params_and_set_trainable_exact_sets(tiny_llama) -> None:  # noqa: ANN001
    inject_cflora(tiny_llama, gate_dim=GATE_DIM)
    scoring = ScoringModel(tiny_llama, 10539, 5230, spa=SPAProjector(embed_dim=8, hidden=64))
    layers = [f"lm.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    lora = {f"{layer}.{ab}.weight" for layer in layers for ab in ("lora_A", "lora_B")}
    gates = {f"{layer}.gate.{i}.{w}" for layer in layers for i in (0, 1, 3) for w in ("weight", "bias")}
    spa = {f"spa.{fc}.{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")}
    assert set(adapter_params(scoring, "lora")) == lora
    assert set(adapter_params(scoring, "gates")) == gates
    assert set(adapter_params(scoring, "spa")) == spa
    for wanted in (lora, gates | spa, spa):
        set_trainable(scoring, wanted)
        assert {n for n, p in scoring.named_parameters() if p.requires_grad} == wanted
    with pytest.raises(ValueError, match="unknown"):
        set_trainable(scoring, {"lm.nope"})
    with pytest.raises(ValueError, match="stage"):
        adapter_params(scoring, "all")  # type: ignore[arg-type]


def test_merged_state_dict_loads_into_stock_llama(tiny_llama, input_ids) -> None:  # noqa: ANN001
    model = copy.deepcopy(tiny_llama)
    inject_cflora(model, dropout=0.0, gate_dim=GATE_DIM)
    _randomize(model)
    with torch.no_grad():  # G_bar as export computes it: the mean gate over (here random) instances
        g_bars = {name: G.mean(dim=0) for name, G in gate_matrices(model, torch.randn(32, GATE_DIM)).items()}
    with gate_context(model, fixed=g_bars):
        exact = _logits(model, input_ids)
    state = model.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    merged = merge_cflora_state_dict(state, g_bars, scaling=2.0)
    assert all(torch.equal(state[k], snapshot[k]) for k in snapshot)  # pure: the input is untouched
    stock = LlamaForCausalLM(tiny_llama.config).eval()
    stock.load_state_dict(merged, strict=True)
    torch.testing.assert_close(_logits(stock, input_ids), exact, atol=1e-5, rtol=0)  # fp32 sum order
    assert not torch.allclose(_logits(stock, input_ids), _logits(tiny_llama, input_ids), atol=1e-3)
    with pytest.raises(KeyError, match="G_bar"):
        merge_cflora_state_dict(state, {}, scaling=2.0)


def test_inject_guards(tiny_llama) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_cflora(tiny_llama, target_modules=("nope",))
    inject_cflora(tiny_llama)
    with pytest.raises(ValueError, match="already"):
        inject_cflora(tiny_llama)
    with pytest.raises(ValueError, match="lacks"):
        load_lora_weights(tiny_llama, {})
    with pytest.raises(ValueError, match="r must be"):
        CFLoRALinear(torch.nn.Linear(4, 4), r=0)


def test_fp32_adapter_over_bf16_base_keeps_the_base_dtype() -> None:
    torch.manual_seed(0)
    layer = CFLoRALinear(torch.nn.Linear(32, 24), r=4, dropout=0.0, gate_dim=None)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 32)
    reference = layer(x)
    layer.base_layer.to(torch.bfloat16)  # what a trainer does: bf16 frozen base, fp32 trainable adapter
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    torch.testing.assert_close(
        out.float(), reference, atol=0.1, rtol=0.02
    )  # bf16 base: ~3 significant digits


def test_training_path_matches_inference_path_and_trains_the_gates(tiny_llama, input_ids) -> None:  # noqa: ANN001
    model = copy.deepcopy(tiny_llama)
    inject_cflora(model, dropout=0.0, gate_dim=GATE_DIM)
    _randomize(model)
    set_trainable(model, adapter_params(model, "gates"))
    h = torch.randn(2, GATE_DIM)
    with gate_context(model, h):
        trained = model(input_ids=input_ids).logits  # autograd: out-of-place accumulation
        with torch.inference_mode():
            served = model(input_ids=input_ids).logits  # in-place accumulation into the base output
    torch.testing.assert_close(trained.detach(), served, atol=ATOL, rtol=0)
    trained[:, -1, :5].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(adapter_params(model, "gates"))
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("gate.3.weight"))


def test_gates_computed_at_once_equal_each_layers_own(tiny_llama, input_ids) -> None:  # noqa: ANN001
    model = copy.deepcopy(tiny_llama)
    inject_cflora(model, dropout=0.0, gate_dim=GATE_DIM)
    _randomize(model)
    h = torch.randn(2, GATE_DIM)
    batched = gate_matrices(model, h)  # one op per gate stage for all layers
    for name, m in cflora_modules(model).items():
        torch.testing.assert_close(batched[name], m.gate_matrix(h), atol=ATOL, rtol=0)
    with gate_context(model, h):  # G·Bᵀ precomputed in the context ...
        via_context = _logits(model, input_ids)
    hooks = [  # ... equals G handed to each layer's forward
        m.register_forward_pre_hook(lambda mod, args, n=n: (args[0], batched[n]))
        for n, m in cflora_modules(model).items()
    ]
    try:
        explicit = _logits(model, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(via_context, explicit, atol=ATOL, rtol=0)
