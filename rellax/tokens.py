"""The tokens ReLLaX adds to and reads from the LLM's vocabulary (docs/design.md §5, §7).

Two added special tokens mark where SPA soft vectors go: `[hist]` after each history item and
`[target]` after the candidate. Their rows in the input embedding are never read by a correct
scorer (SPA overwrites them), but they must exist so the prompt tokenises to one id per placeholder.

The answer ids are *found*, not assumed: the chat is rendered with and without the assistant's
answer and the two token sequences are diffed, so a template that merges a leading space into the
answer ("ASSISTANT:" + " Yes") is handled the same way as SmolLM2's "<|im_start|>assistant\\n" + "Yes".
"""

from __future__ import annotations

import functools

import torch
from transformers import AddedToken

__all__ = [
    "ANSWERS",
    "HIST_TOKEN",
    "TARGET_TOKEN",
    "add_soft_tokens",
    "answer_sequences",
    "answer_token_ids",
    "render_chat",
]

HIST_TOKEN = "[hist]"
TARGET_TOKEN = "[target]"
ANSWERS = ("Yes.", "No.")  # docs/design.md §5: the answers the model is trained to give, label 1 then 0

# Vicuna v1.1's conversation format, for tokenizers without a chat template of their own (docs/design.md §5).
VICUNA_TEMPLATE = (
    "{{ bos_token }}A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
    "{% for m in messages %}{% if m['role'] == 'user' %} USER: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def add_soft_tokens(tokenizer, model: torch.nn.Module | None = None) -> tuple[int, int]:  # noqa: ANN001
    """Add `[hist]` and `[target]` as special tokens (idempotent) and return their ids.

    `lstrip=True` lets each placeholder absorb the space written before it, so a placeholder costs
    one token, not two; the space carries no meaning next to a vector that replaces the token.
    With `model`, its input embeddings grow to cover the new ids. New rows are zero: SPA replaces
    them on input, and with tied embeddings a zero row also means the LM head gives those ids logit
    0 while every existing row (the Yes/No rows included) is kept bit for bit.
    """
    new = [
        AddedToken(text, special=True, normalized=False, lstrip=True)
        for text in (HIST_TOKEN, TARGET_TOKEN)
        if text not in tokenizer.get_added_vocab()
    ]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    hist_id, target_id = tokenizer.convert_tokens_to_ids([HIST_TOKEN, TARGET_TOKEN])
    if model is not None:
        embeddings = model.get_input_embeddings()
        old = embeddings.num_embeddings
        if old <= max(hist_id, target_id):
            model.resize_token_embeddings(max(hist_id, target_id) + 1, mean_resizing=False)
            with torch.no_grad():
                model.get_input_embeddings().weight[old:].zero_()
                head = model.get_output_embeddings()
                if head is not None and head.weight.shape[0] > old:
                    head.weight[old:].zero_()
    return int(hist_id), int(target_id)


def render_chat(tokenizer, user: str, assistant: str | None = None) -> str:  # noqa: ANN001
    """The chat text of one user turn, opened for the assistant or closed with its answer.

    The tokenizer's own chat template is used; Vicuna's only when it has none (docs/design.md §5).
    """
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=assistant is None,
        chat_template=None if tokenizer.chat_template else VICUNA_TEMPLATE,
    )


def _encode(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    # The rendered chat already holds every special token the template wants (BOS included).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=16)
def _answer_tokens(tokenizer, vocab_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:  # noqa: ANN001
    del vocab_size  # part of the cache key only: adding tokens can change tokenisation
    probe = "Answer yes or no."
    prompt = _encode(tokenizer, render_chat(tokenizer, probe))
    answers = []
    for answer in ANSWERS:
        text = render_chat(tokenizer, probe, answer)
        full = _encode(tokenizer, text)
        if full[: len(prompt)] != prompt:
            # The template's generation prompt ends in text the answer merges into (e.g. a trailing
            # space): scoring at the prompt's last token would then predict the wrong thing.
            raise ValueError(
                f"the chat template's generation prompt is not a token prefix of the answered chat "
                f"for {answer!r}: prompt ends {prompt[-3:]}, answered chat has "
                f"{full[len(prompt) - 3 : len(prompt) + 2]} there"
            )
        # Whatever the template writes after the answer (end of turn, EOS) is not part of it.
        closing = _encode(tokenizer, text[text.rindex(answer) + len(answer) :])
        end = len(full) - len(closing) if closing and full[-len(closing) :] == closing else len(full)
        answers.append(tuple(full[len(prompt) : end]))
    if not answers[0] or not answers[1] or answers[0][0] == answers[1][0]:
        raise ValueError(f"'Yes.' and 'No.' must start with different tokens, got {answers}")
    return answers[0], answers[1]


def answer_sequences(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:  # noqa: ANN001
    """Token ids of "Yes." and "No." as the assistant's turn starts with them, without the
    template's end-of-turn tokens (cached per tokenizer and vocabulary size)."""
    return _answer_tokens(tokenizer, len(tokenizer))


def answer_token_ids(tokenizer) -> tuple[int, int]:  # noqa: ANN001
    """(yes_id, no_id): the first tokens of "Yes." and "No." right after the generation prompt.

    These are the two LM-head rows the scorer reads at the prompt's last position. For SmolLM2
    they are 10539 ("Yes") and 5230 ("No"): no leading space after "<|im_start|>assistant\\n".
    """
    yes, no = _answer_tokens(tokenizer, len(tokenizer))
    return yes[0], no[0]
