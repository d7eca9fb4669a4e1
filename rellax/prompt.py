"""The one prompt builder: training, evaluation and serving all call `build_prompt` (docs/design.md §2, §5).

Train/serve skew is the classic bug of this field, so nothing else in rellax writes prompt text.
A prompt is the docs/design.md §5 body (ML-1M wording) inside the tokenizer's chat template, as one user
turn with the generation prompt opened; the model's next token after it is the answer.

Wording choices the design leaves open:
- Pronouns follow `Profile.gender` ("male" -> he/his, "female" -> she/her). Any other value
  (e.g. "unknown") reads "The user's gender is unknown." and uses they/their, with "they have".
  A data set's own profile fields follow job and age, one sentence each ("Their country is Peru.").
- Ratings are shown as integers; "1 star" is singular, every other value says "stars".
- The user id never appears. History items are numbered from 0 in the order shown, and the list is
  written the way Python prints a list of strings (as ReLLa's code does), quotes included.
- With SPA each history entry ends in " [hist]" and the candidate's title in " [target]"; without
  SPA neither placeholder is written.

Speed: tokenising a 500-token prompt costs milliseconds, more than the rest of prompt building.
The chat template is rendered once per tokenizer around a marker body, and the body is cut into
pieces (profile header, one piece per history entry, the question) whose token ids are memoised:
a user's entries recur across all of their candidates and samples. Concatenating pieces' ids equals
tokenising the whole text only if no token crosses a cut; every cut sits between the same fixed
characters, so this is checked once per tokenizer on probe bodies (falling back to whole-text
tokenisation when it fails) and pinned by a test over many random prompts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rellax.domain import MOVIES, Domain
from rellax.entities import Item, Profile
from rellax.tokens import HIST_TOKEN, TARGET_TOKEN, answer_sequences, render_chat

__all__ = [
    "Prompt",
    "SubrSelector",
    "answer_ids",
    "build_item_prompt",
    "build_prompt",
    "build_user_prompt",
    "select_history",
]

# subr(history_item_ids, candidate_id, k) -> chronological positions into the history.
SubrSelector = Callable[[Sequence[int], int, int], np.ndarray]

_BODY_MARKER = "\x1eRELLAX_BODY\x1e"
_PIECE_CACHE_SIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class Prompt:
    """One (user, candidate) prompt, ready for the scorer.

    Attributes:
        text: the full chat text (template included).
        input_ids: its token ids; identical to tokenising `text` without extra special tokens.
        hist_positions: token positions of the `[hist]` placeholders, in text order (empty without SPA).
        target_position: token position of `[target]`, or None without SPA.
        hist_item_ids: the item ids of the history entries shown, in text (= chronological) order.
        target_item_id: the candidate's item id.
        selected: positions, in the full history, of the entries shown.
    """

    text: str
    input_ids: list[int]
    hist_positions: list[int]
    target_position: int | None
    hist_item_ids: list[int]
    target_item_id: int
    selected: list[int]

    @property
    def soft_positions(self) -> list[int]:
        """Every placeholder position in text order: the `[hist]` ones, then `[target]`."""
        return (
            self.hist_positions
            if self.target_position is None
            else [*self.hist_positions, self.target_position]
        )

    @property
    def soft_item_ids(self) -> list[int]:
        """The item behind each placeholder of `soft_positions` (empty without SPA)."""
        return [] if self.target_position is None else [*self.hist_item_ids, self.target_item_id]


def _stars(rating: float) -> str:
    stars = int(round(float(rating)))
    return f"{stars} star" if stars == 1 else f"{stars} stars"


def _rating_text(rating: float, domain: Domain) -> str:
    if domain.rating == "stars":
        return f" ({_stars(rating)})"
    if domain.rating == "label":
        return " (liked)" if float(rating) > 3 else " (disliked)"  # label data: ratings 5 / 1
    return ""


def _body_pieces(
    profile: Profile,
    shown: Sequence[tuple[Item, float]],
    candidate: Item,
    *,
    spa: bool,
    domain: Domain = MOVIES,
) -> list[str]:
    """The docs/design.md §5 user-turn text, cut into pieces that tokenise independently.

    Pieces: the profile header, one piece per history entry (its list punctuation included: `['..',`
    then ` '..',` ... ` '..']`, written exactly as Python prints a list of strings) and the question.
    Every cut sits between the same characters whatever the titles are, which is why cutting there
    is safe once checked on a probe (see `_chat_frame`). `domain` supplies the words; its defaults
    are the MovieLens prompt.
    """
    gender = profile.gender.lower()
    if "gender" not in domain.profile:
        subject, possessive, has, intro = "The user", "The user's", "has", ""
    elif gender in ("male", "female"):
        subject, possessive, has = ("He", "His", "has") if gender == "male" else ("She", "Her", "has")
        intro = f"The user is a {gender}."
    else:
        subject, possessive, has = "They", "Their", "have"
        intro = "The user's gender is unknown."
    facts = [intro] if intro else []
    if "job" in domain.profile:
        facts.append(f"{possessive} job is {profile.job}.")
    if "age" in domain.profile:
        facts.append(f"{possessive} age is {profile.age}.")
    for name in domain.extra_profile:  # the data set's own profile fields, one sentence each
        facts.append(f"{possessive} {name.replace('_', ' ')} is {profile.value(name)}.")
    rated = ", and rated them" if domain.rating != "none" else ""
    hist_mark, target_mark = (f" {HIST_TOKEN}", f" {TARGET_TOKEN}") if spa else ("", "")
    header = (
        " ".join(facts) + "\n" if facts else ""
    ) + f"{subject} {domain.verb} the following {domain.plural} in order in the past{rated}:\n"
    last = len(shown) - 1
    entries = [
        ("[" if i == 0 else " ")
        + repr(f"{i}. {item.title}{_rating_text(r, domain)}{hist_mark}")
        + ("]" if i == last else ",")
        for i, (item, r) in enumerate(shown)
    ]
    who = "the user" if subject == "The user" else subject.lower()
    note = (
        f"Note that more stars the user rated the {domain.noun}, the more the user liked the {domain.noun}.\n"
        if domain.rating == "stars"
        else ""
    )
    question = (
        f"\nBased on the {domain.plural} {who} {has} {domain.verb}, deduce if {who} will like "
        f"the {domain.noun} ***{candidate.title}***{target_mark}.\n"
        f"{note}"
        "You should ONLY tell me yes or no."
    )
    return [header, *(entries or ["[]"]), question]


def select_history(
    history_item_ids: Sequence[int],
    candidate_id: int,
    *,
    k: int,
    mode: Literal["recency", "subr"],
    subr: SubrSelector | None = None,
) -> list[int]:
    """Chronological positions of the history entries to show: the last k, or SUBR's top k.

    A history of at most k entries is shown whole in both modes (SUBR would pick all of it).
    """
    n = len(history_item_ids)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if mode not in ("recency", "subr"):
        raise ValueError(f"mode must be 'recency' or 'subr', got {mode!r}")
    if n <= k:
        return list(range(n))
    if mode == "recency":
        return list(range(n - k, n))
    if subr is None:
        raise ValueError("mode='subr' needs a `subr` callable (e.g. partial(subr_positions, item_index))")
    picked = [int(p) for p in np.asarray(subr(history_item_ids, candidate_id, k)).ravel()]
    if len(picked) > k or any(not 0 <= p < n for p in picked) or picked != sorted(set(picked)):
        raise ValueError(
            f"subr must return at most {k} distinct increasing positions in [0, {n}), got {picked}"
        )
    return picked


@dataclass(frozen=True, slots=True)
class _ChatFrame:
    prefix: str
    suffix: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    encode_piece: Callable[[str], tuple[int, ...]]  # memoised
    pieces_exact: bool  # prefix + pieces + suffix tokenise to the concatenation of their ids
    hist_id: int | None
    target_id: int | None

    def encode(self, tokenizer, pieces: Sequence[str]) -> list[int]:  # noqa: ANN001
        if not self.pieces_exact:
            return _encode(tokenizer, self.prefix + "".join(pieces) + self.suffix)
        ids = list(self.prefix_ids)
        for piece in pieces:
            ids.extend(self.encode_piece(piece))
        ids.extend(self.suffix_ids)
        return ids


def _encode(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    # The rendered chat holds every special token its template wants (BOS included), so none is added.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _probe_bodies(domain: Domain) -> list[list[str]]:
    """Bodies with every kind of cut: both quote styles, 0/1/many entries, 2-digit numbers, SPA on/off."""
    items = [
        Item(i, title, "Drama") for i, title in enumerate(["Heat", "Schindler's List", "M*A*S*H", "Babe"])
    ]
    history = [(items[i % 4], float(1 + i % 5)) for i in range(12)]
    return [
        _body_pieces(profile, history[:n], items[3], spa=spa, domain=domain)
        for profile in (Profile("male", "25-34", "writer"), Profile())
        for n in (0, 1, 12)
        for spa in (False, True)
    ]


@functools.lru_cache(maxsize=16)
def _chat_frame(tokenizer, vocab_size: int, domain: Domain = MOVIES) -> _ChatFrame:  # noqa: ANN001
    del vocab_size  # cache key only: adding the soft tokens changes tokenisation
    prefix, marker, suffix = render_chat(tokenizer, _BODY_MARKER).partition(_BODY_MARKER)
    if not marker:
        raise ValueError("the chat template does not pass the user's text through verbatim")
    encode_piece = functools.lru_cache(maxsize=_PIECE_CACHE_SIZE)(
        lambda text: tuple(_encode(tokenizer, text))
    )
    prefix_ids, suffix_ids = tuple(_encode(tokenizer, prefix)), tuple(_encode(tokenizer, suffix))
    exact = all(
        [*prefix_ids, *(t for piece in pieces for t in encode_piece(piece)), *suffix_ids]
        == _encode(tokenizer, prefix + "".join(pieces) + suffix)
        for pieces in _probe_bodies(domain)
    )
    added = tokenizer.get_added_vocab()
    return _ChatFrame(
        prefix,
        suffix,
        prefix_ids,
        suffix_ids,
        encode_piece,
        exact,
        added.get(HIST_TOKEN),
        added.get(TARGET_TOKEN),
    )


def build_prompt(
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    profile: Profile,
    history: Sequence[tuple[Item, float]],
    candidate: Item,
    *,
    k: int,
    mode: Literal["recency", "subr"],
    spa: bool,
    subr: SubrSelector | None = None,
    domain: Domain = MOVIES,
) -> Prompt:
    """Select up to k history entries, render the prompt and tokenise it.

    Args:
        tokenizer: the scoring LLM's tokenizer; with `spa=True` it must have the soft tokens
            (`rellax.tokens.add_soft_tokens`).
        profile: the user's profile (the user id is never shown).
        history: the user's full history, oldest first, as (item, rating).
        candidate: the item to score.
        k: how many history entries to show at most.
        mode: "recency" shows the last k; "subr" shows `subr(history_item_ids, candidate_id, k)`.
        spa: write the `[hist]`/`[target]` placeholders for SPA vectors.
        subr: the SUBR selector, needed for mode="subr".
        domain: the data set's wording (item noun, rating display, profile fields).

    Raises:
        ValueError: bad k/mode/subr output, soft tokens missing, or an item title that itself
            contains a placeholder (the placeholder count would no longer match the items).
    """
    item_ids = [item.item_id for item, _ in history]
    selected = select_history(item_ids, candidate.item_id, k=k, mode=mode, subr=subr)
    shown = [history[p] for p in selected]
    frame = _chat_frame(tokenizer, len(tokenizer), domain)
    if spa and (frame.hist_id is None or frame.target_id is None):
        raise ValueError("spa=True needs the soft tokens: call rellax.tokens.add_soft_tokens(tokenizer)")
    pieces = _body_pieces(profile, shown, candidate, spa=spa, domain=domain)
    input_ids = frame.encode(tokenizer, pieces)
    hist_positions = [i for i, t in enumerate(input_ids) if t == frame.hist_id]
    target_positions = [i for i, t in enumerate(input_ids) if t == frame.target_id]
    expected_hist, expected_target = (len(shown), 1) if spa else (0, 0)
    if len(hist_positions) != expected_hist or len(target_positions) != expected_target:
        raise ValueError(
            f"prompt has {len(hist_positions)} {HIST_TOKEN} / {len(target_positions)} {TARGET_TOKEN} tokens, "
            f"expected {expected_hist} / {expected_target}: does an item title contain a placeholder?"
        )
    return Prompt(
        text=frame.prefix + "".join(pieces) + frame.suffix,
        input_ids=input_ids,
        hist_positions=hist_positions,
        target_position=target_positions[0] if spa else None,
        hist_item_ids=[item.item_id for item, _ in shown],
        target_item_id=candidate.item_id,
        selected=selected,
    )


def answer_ids(tokenizer, label: int) -> list[int]:  # noqa: ANN001
    """Token ids of the answer, "Yes." (label 1) or "No." (label 0), as the assistant's turn starts.

    Training appends these to `Prompt.input_ids` and puts cross-entropy on them only; their first
    token is what `rellax.tokens.answer_token_ids` returns and the scorer reads.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    yes, no = answer_sequences(tokenizer)
    return list(yes if label == 1 else no)


# LLM-SRec (docs/design.md §11) reads two more prompts through the same placeholders: `[hist]` is
# its [HistoryEmb] (a projected SASRec item embedding goes there) and `[target]` its [UserOut] /
# [ItemOut] (a learned vector goes there, and the representation is read at that position). Plain
# text, no chat template: nothing is generated, and the read-out token is the prompt's last.
def _soft_prompt(tokenizer, text: str, hist_ids: list[int], target_id: int, n_hist: int) -> Prompt:  # noqa: ANN001
    frame = _chat_frame(tokenizer, len(tokenizer))
    if frame.hist_id is None or frame.target_id is None:
        raise ValueError(
            "LLM-SRec prompts need the soft tokens: call rellax.tokens.add_soft_tokens(tokenizer)"
        )
    input_ids = _encode(tokenizer, text)
    hist = [i for i, t in enumerate(input_ids) if t == frame.hist_id]
    target = [i for i, t in enumerate(input_ids) if t == frame.target_id]
    if len(hist) != n_hist or target != [len(input_ids) - 1]:
        found = f"{len(hist)} {HIST_TOKEN} / {len(target)} {TARGET_TOKEN}"
        raise ValueError(
            f"prompt has {found} tokens, expected {n_hist} / 1 at the end: a title with a placeholder?"
        )
    return Prompt(text, input_ids, hist, target[0], hist_ids, target_id, list(range(n_hist)))


def build_user_prompt(
    tokenizer,  # noqa: ANN001
    history: Sequence[tuple[Item, int]],
    *,
    k: int = 10,
    domain: Domain = MOVIES,
) -> Prompt:
    """LLM-SRec's user prompt: the last k (item, unix time) entries, oldest first, each as its date,
    title and a `[hist]` token, then `[target]` (the [UserOut] position). `target_item_id` is -1."""
    import datetime

    shown = list(history)[-k:] if k > 0 else []
    lines = [
        f"{datetime.datetime.fromtimestamp(int(ts), datetime.UTC).date()}: {item.title} {HIST_TOKEN}\n"
        for item, ts in shown
    ]
    text = (
        f"A user {domain.verb} these {domain.plural}, oldest first:\n"
        + "".join(lines)
        + f"The {domain.noun} this user will {domain.verb_next} next is {TARGET_TOKEN}"
    )
    return _soft_prompt(tokenizer, text, [item.item_id for item, _ in shown], -1, len(shown))


def build_item_prompt(tokenizer, item: Item, domain: Domain = MOVIES) -> Prompt:  # noqa: ANN001
    """LLM-SRec's item prompt: the item's title and genre with one `[hist]` (the item's own SASRec
    embedding, as the authors' item prompt carries its [HistoryEmb]), then `[target]` ([ItemOut])."""
    return _soft_prompt(
        tokenizer,
        f"The {domain.noun} {item.title} {HIST_TOKEN}, a {item.genre.lower()} {domain.kind}, "
        f"is {TARGET_TOKEN}",
        [item.item_id],
        item.item_id,
        1,
    )
