"""The one prompt builder: golden text, placeholders, answer ids, selection, cached tokenisation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rellax.entities import Item, Profile
from rellax.prompt import Prompt, answer_ids, build_prompt, select_history
from rellax.tokens import HIST_TOKEN, TARGET_TOKEN, add_soft_tokens, answer_token_ids, render_chat

PROFILE = Profile(gender="female", age="25-34", job="writer")
HISTORY = [
    (Item(1, "Toy Story", "Animation"), 5.0),
    (Item(50, "Star Wars", "Action"), 4.0),
    (Item(318, "Schindler's List", "Drama"), 1.0),
    (Item(100, "Fargo", "Crime"), 3.0),
    (Item(181, "Return of the Jedi", "Action"), 2.0),
]
CANDIDATE = Item(127, "Godfather, The", "Action")

GOLDEN_SPA = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "The user is a female. Her job is writer. Her age is 25-34.\n"
    "She watched the following movies in order in the past, and rated them:\n"
    "['0. Star Wars (4 stars) [hist]', \"1. Schindler's List (1 star) [hist]\", "
    "'2. Fargo (3 stars) [hist]', '3. Return of the Jedi (2 stars) [hist]']\n"
    "Based on the movies she has watched, deduce if she will like the movie ***Godfather, The*** [target].\n"
    "Note that more stars the user rated the movie, the more the user liked the movie.\n"
    "You should ONLY tell me yes or no.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _golden(tok, spa: bool) -> Prompt:  # noqa: ANN001
    return build_prompt(tok, PROFILE, HISTORY, CANDIDATE, k=4, mode="recency", spa=spa)


def test_golden_prompt_with_spa(soft_tokenizer) -> None:  # noqa: ANN001
    prompt = _golden(soft_tokenizer, spa=True)
    assert prompt.text == GOLDEN_SPA
    assert prompt.input_ids == soft_tokenizer(GOLDEN_SPA, add_special_tokens=False)["input_ids"]
    assert prompt.selected == [1, 2, 3, 4]
    assert prompt.hist_item_ids == [50, 318, 100, 181]
    assert prompt.target_item_id == 127
    assert "(1 star)" in prompt.text and "(1 stars)" not in prompt.text


def test_golden_prompt_without_spa_has_no_placeholders(soft_tokenizer) -> None:  # noqa: ANN001
    prompt = _golden(soft_tokenizer, spa=False)
    assert prompt.text == GOLDEN_SPA.replace(f" {HIST_TOKEN}", "").replace(f" {TARGET_TOKEN}", "")
    hist_id, target_id = add_soft_tokens(soft_tokenizer)
    assert hist_id not in prompt.input_ids and target_id not in prompt.input_ids
    assert prompt.hist_positions == [] and prompt.target_position is None
    assert prompt.soft_positions == [] and prompt.soft_item_ids == []
    assert prompt.hist_item_ids == [50, 318, 100, 181]  # what was shown, with or without SPA


@pytest.mark.parametrize("k", [1, 3, 5, 30])
def test_k_plus_one_placeholders_in_text_order(soft_tokenizer, k: int) -> None:  # noqa: ANN001
    hist_id, target_id = add_soft_tokens(soft_tokenizer)
    prompt = build_prompt(soft_tokenizer, PROFILE, HISTORY, CANDIDATE, k=k, mode="recency", spa=True)
    shown = min(k, len(HISTORY))
    assert len(prompt.hist_positions) == shown
    assert [prompt.input_ids[p] for p in prompt.hist_positions] == [hist_id] * shown
    assert prompt.input_ids[prompt.target_position] == target_id
    assert prompt.soft_positions == sorted(prompt.soft_positions)
    assert prompt.soft_positions[-1] == prompt.target_position
    assert prompt.soft_item_ids == [item.item_id for item, _ in HISTORY[-shown:]] + [127]
    # each [hist] closes its own entry: the text since the previous placeholder holds that title
    starts = [0, *prompt.hist_positions[:-1]]
    for start, pos, (item, rating) in zip(starts, prompt.hist_positions, HISTORY[-shown:], strict=True):
        segment = soft_tokenizer.decode(prompt.input_ids[start + 1 : pos])
        assert segment.endswith(f"{item.title} ({int(rating)} star{'' if rating == 1 else 's'})"), segment


def test_answer_ids_are_yes_no_and_follow_the_prompt(soft_tokenizer) -> None:  # noqa: ANN001
    assert answer_token_ids(soft_tokenizer) == (10539, 5230)
    assert answer_ids(soft_tokenizer, 1)[0] == 10539 and answer_ids(soft_tokenizer, 0)[0] == 5230
    prompt = _golden(soft_tokenizer, spa=True)
    for label, answer in ((1, "Yes."), (0, "No.")):
        body = prompt.text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        answered = soft_tokenizer(render_chat(soft_tokenizer, body, answer), add_special_tokens=False)[
            "input_ids"
        ]
        # training appends answer_ids to the prompt: the same ids as the chat with the answer in it
        seq = prompt.input_ids + answer_ids(soft_tokenizer, label)
        assert answered[: len(seq)] == seq
    with pytest.raises(ValueError, match="label"):
        answer_ids(soft_tokenizer, 2)


def test_unknown_gender_uses_they(soft_tokenizer) -> None:  # noqa: ANN001
    prompt = build_prompt(soft_tokenizer, Profile(), HISTORY, CANDIDATE, k=2, mode="recency", spa=False)
    assert (
        "The user's gender is unknown. Their job is unknown. Their age is unknown.\nThey watched"
        in prompt.text
    )
    assert "Based on the movies they have watched, deduce if they will like the movie" in prompt.text


def _nearest_ids(history_item_ids, candidate_id: int, k: int) -> np.ndarray:  # noqa: ANN001
    """A deterministic stand-in for SUBR: the k ids closest to the candidate's, chronological."""
    distance = np.abs(np.asarray(history_item_ids) - candidate_id)
    return np.sort(np.argsort(distance, kind="stable")[:k])


def test_recency_vs_subr_selection(soft_tokenizer) -> None:  # noqa: ANN001
    recency = build_prompt(soft_tokenizer, PROFILE, HISTORY, CANDIDATE, k=2, mode="recency", spa=True)
    subr = build_prompt(
        soft_tokenizer, PROFILE, HISTORY, CANDIDATE, k=2, mode="subr", spa=True, subr=_nearest_ids
    )
    assert recency.selected == [3, 4] and recency.hist_item_ids == [100, 181]
    # |id - 127|: 126, 77, 191, 27, 54 -> positions 3 and 4 ... then 1; k=2 -> [3, 4]; k=3 -> [1, 3, 4]
    subr3 = build_prompt(
        soft_tokenizer, PROFILE, HISTORY, CANDIDATE, k=3, mode="subr", spa=True, subr=_nearest_ids
    )
    assert subr.selected == [3, 4]
    assert subr3.selected == [1, 3, 4] and subr3.hist_item_ids == [50, 100, 181]
    assert "'0. Star Wars (4 stars) [hist]', '1. Fargo (3 stars) [hist]'" in subr3.text
    far = build_prompt(
        soft_tokenizer,
        PROFILE,
        HISTORY,
        Item(2, "GoldenEye", "Action"),
        k=2,
        mode="subr",
        spa=True,
        subr=_nearest_ids,
    )
    assert far.selected == [0, 1] and far.hist_item_ids == [1, 50]


def test_select_history_rules() -> None:
    calls = []

    def spy(ids, cand, k):  # noqa: ANN001, ANN202
        calls.append((list(ids), cand, k))
        return np.array([0, 2])

    assert select_history([5, 6, 7], 9, k=5, mode="subr", subr=spy) == [0, 1, 2]
    assert calls == []  # a history no longer than k is shown whole: nothing to retrieve
    assert select_history([5, 6, 7, 8], 9, k=2, mode="subr", subr=spy) == [0, 2]
    assert calls == [([5, 6, 7, 8], 9, 2)]
    assert select_history([5, 6, 7, 8], 9, k=0, mode="recency") == []
    for bad in (np.array([2, 0]), np.array([0, 0]), np.array([0, 9]), np.array([0, 1, 2])):
        with pytest.raises(ValueError, match="subr must return"):
            select_history([5, 6, 7, 8], 9, k=2, mode="subr", subr=lambda *a, bad=bad: bad)
    with pytest.raises(ValueError, match="needs a `subr`"):
        select_history([5, 6, 7, 8], 9, k=2, mode="subr")
    with pytest.raises(ValueError, match="mode"):
        select_history([5, 6, 7, 8], 9, k=2, mode="random")  # type: ignore[arg-type]


def test_empty_history_and_guards(soft_tokenizer, tokenizer) -> None:  # noqa: ANN001
    empty = build_prompt(soft_tokenizer, PROFILE, [], CANDIDATE, k=5, mode="recency", spa=True)
    assert "rated them:\n[]\nBased" in empty.text and empty.hist_positions == []
    assert empty.input_ids[empty.target_position] == add_soft_tokens(soft_tokenizer)[1]
    with pytest.raises(ValueError, match="add_soft_tokens"):
        build_prompt(tokenizer, PROFILE, HISTORY, CANDIDATE, k=2, mode="recency", spa=True)
    sneaky = [(Item(7, "The [hist] Affair", "Drama"), 4.0)]
    with pytest.raises(ValueError, match="placeholder"):
        build_prompt(soft_tokenizer, PROFILE, sneaky, CANDIDATE, k=2, mode="recency", spa=True)


WEIRD_TITLES = [
    "Schindler's List",
    'The "Quoted" One',
    "Both ' and \" quotes",
    "M*A*S*H",
    "Amélie",
    "Crouching Tiger, Hidden Dragon (Wo hu cang long)",
    "Back\\slash",
    "  spaced  out ",
    "8 1/2",
    "2001: A Space Odyssey",
    "[bracketed]",
    "***starred***",
    "Ends with a dot.",
    "<|im_start|>",  # a special token's text inside a title: still identical to whole-text tokenising
]


def test_cached_tokenisation_equals_whole_text(soft_tokenizer, ml100k) -> None:  # noqa: ANN001
    rng = random.Random(7)
    titles = [item.title for item in ml100k.item_records()] + WEIRD_TITLES
    genders, jobs, ages = (
        ["male", "female", "unknown"],
        ["writer", "K-12 student", "other"],
        ["18-24", "above 56"],
    )
    for trial in range(300):
        history = [
            (Item(i, rng.choice(titles), "Drama"), float(rng.randint(1, 5)))
            for i in range(rng.randint(0, 40))
        ]
        profile = Profile(rng.choice(genders), rng.choice(ages), rng.choice(jobs))
        candidate = Item(10_000, rng.choice(titles), "Drama")
        spa = trial % 2 == 0
        prompt = build_prompt(
            soft_tokenizer, profile, history, candidate, k=rng.randint(0, 30), mode="recency", spa=spa
        )
        expected = soft_tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        assert prompt.input_ids == expected, prompt.text


def test_add_soft_tokens_is_idempotent_and_keeps_answer_rows(tokenizer_dir, tiny_llama) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    yes, no = answer_token_ids(tok)
    vocab = len(tok)
    before = tiny_llama.get_output_embeddings().weight[[yes, no]].clone()
    ids = add_soft_tokens(tok, tiny_llama)
    assert ids == (vocab, vocab + 1) and len(tok) == vocab + 2
    assert add_soft_tokens(tok, tiny_llama) == ids and len(tok) == vocab + 2
    emb, head = tiny_llama.get_input_embeddings().weight, tiny_llama.get_output_embeddings().weight
    assert emb.shape[0] == vocab + 2 and head.data_ptr() == emb.data_ptr()  # still tied
    assert torch.equal(head[[yes, no]], before)
    assert torch.equal(emb[vocab:], torch.zeros(2, emb.shape[1]))
    assert answer_token_ids(tok) == (yes, no)


def test_tokenizer_without_chat_template_uses_vicuna_and_finds_the_spaced_answer(tokenizer_dir) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    add_soft_tokens(tok)
    prompt = _golden(tok, spa=True)
    assert prompt.text.startswith(
        f"{tok.bos_token}A chat between a curious user and an artificial intelligence"
    )
    assert " USER: The user is a female." in prompt.text and prompt.text.endswith("yes or no. ASSISTANT:")
    assert prompt.input_ids == tok(prompt.text, add_special_tokens=False)["input_ids"]
    # "ASSISTANT:" + " Yes.": the answer token carries the space ("ĠYes"), and it is found, not assumed
    yes, no = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["ĠYes", "ĠNo"]
    assert answer_ids(tok, 1) == tok(" Yes.", add_special_tokens=False)["input_ids"]  # no EOS: not the answer


GOLDEN_ML100K = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nThe user is a male. His job is educator. His age is above 56.\n"
    "He watched the following movies in order in the past, and rated them:\n"
    "['0. M*A*S*H (5 stars)', '1. Godfather, The (4 stars)', '2. Cinema Paradiso (5 stars)']\n"
    "Based on the movies he has watched, deduce if he will like the movie ***Godfather: Part II, The***.\n"
    "Note that more stars the user rated the movie, the more the user liked the movie.\n"
    "You should ONLY tell me yes or no.<|im_end|>\n<|im_start|>assistant\n"
)


def test_golden_prompt_for_the_first_ml100k_test_sample(tokenizer, ml100k, ml100k_samples) -> None:  # noqa: ANN001
    """The real data path: the first test-split sample (user 90, 72 history items, candidate 187),
    recency K=3, its profile and titles exactly as the loaders and the prompt builder give them."""
    from training.llm.data import Catalogue

    catalogue = Catalogue.from_tables(ml100k)
    row = int(ml100k_samples.indices("test")[0])
    items, ratings, _ = ml100k_samples.history(row)
    uid = ml100k_samples.user_id(row)
    assert (uid, int(ml100k_samples.item_id[row]), len(items)) == (90, 187, 72)
    entries = [(catalogue.items[int(i)], float(r)) for i, r in zip(items, ratings, strict=True)]
    candidate = catalogue.items[int(ml100k_samples.item_id[row])]
    profile = catalogue.profiles[uid]
    prompt = build_prompt(tokenizer, profile, entries, candidate, k=3, mode="recency", spa=False)
    assert prompt.text == GOLDEN_ML100K
    assert (
        prompt.selected == [69, 70, 71]
        and prompt.input_ids == tokenizer(GOLDEN_ML100K, add_special_tokens=False)["input_ids"]
    )
