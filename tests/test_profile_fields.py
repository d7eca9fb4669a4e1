"""A data set's own profile fields (`profile_fields` in dataset.toml): read from `.user`, stated by
the prompt, embedded by DIN, stored and served; MovieLens, which has none, is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import asgi_app, make_settings

from data.config import ML100K, DatasetConfig, load_config
from data.dataset import read_dataset
from rellax.din import DIN, DINConfig, DINVocab, encode_batch
from rellax.entities import Item, Profile
from rellax.errors import DataError
from rellax.prompt import build_prompt
from service.store import HistoryStore, UserRecord
from tests.domain_support import write_books
from training.crm.config import CRMConfig

COUNTRIES = ("France", "Peru", "Japan")


def _with_profiles(folder: Path) -> Path:
    """The books data set plus a `.user` file: gender, country and plan for all users but the last."""
    lines = ["user_id:token\tgender:token\tcountry:token\tplan:token"]
    for u in range(39):  # u039 has interactions but no .user row
        gender = "female" if u % 2 else "male"
        lines.append(f"u{u:03d}\t{gender}\t{COUNTRIES[u % 3]}\t{'premium' if u % 4 == 0 else 'free'}")
    (folder / "books.user").write_text("\n".join(lines) + "\n")
    config = (folder / "dataset.toml").read_text()
    (folder / "dataset.toml").write_text(
        'gender_field = "gender"\nprofile_fields = ["country", "plan"]\n' + config
    )
    return folder


@pytest.fixture()
def books(tmp_path: Path) -> Path:
    return _with_profiles(write_books(tmp_path / "books"))


def test_the_fields_are_read_and_stated_by_the_prompt(books: Path, soft_tokenizer) -> None:  # noqa: ANN001
    data = read_dataset(books, load_config(books))
    assert list(data.users.columns) == ["user_id", "gender", "age", "job", "country", "plan"]
    first = data.profile(1)  # u000
    assert first == Profile("male", "unknown", "unknown", (("country", "France"), ("plan", "premium")))
    assert data.profile(40).value("country") == "unknown"  # no .user row: unknown, not missing
    assert data.profiles()[2].value("plan") == "free"
    domain = data.domain
    assert domain.profile == ("gender",) and domain.extra_profile == ("country", "plan")
    history = [(Item(13, "Salt Map 12", "poetry"), 1.0)]
    prompt = build_prompt(
        soft_tokenizer, data.profile(2), history, Item(8, "Iron Letters 7", "history"), k=5, mode="recency",
        spa=False, domain=domain,
    )  # fmt: skip
    assert (
        "The user is a female. Her country is Peru. Her plan is free.\nShe read the following" in prompt.text
    )
    # MovieLens has no such fields: its config and prompt wording are what they were.
    assert ML100K.profile_fields == [] and ML100K.domain().extra_profile == ()
    assert "profile_fields" not in ML100K.fingerprint()


def test_a_profile_is_one_value_whatever_order_its_fields_come_in(books: Path, soft_tokenizer) -> None:  # noqa: ANN001
    """The data set lists its fields in config order, a JSON object and a Redis hash in theirs: the
    same fields are the same profile (equal, same hash), and the prompt keeps the config's order."""
    from service.schemas import ProfileIn

    config = load_config(books).model_copy(update={"profile_fields": ["plan", "country"]})
    data = read_dataset(books, config)
    u001 = data.profile(2)
    sent = ProfileIn(gender="female", extra={"country": "Peru", "plan": "free"}).to_profile()
    assert u001 == sent and hash(u001) == hash(sent)
    history = [(Item(13, "Salt Map 12", "poetry"), 1.0)]
    prompt = build_prompt(
        soft_tokenizer, u001, history, Item(8, "Iron Letters 7", "history"), k=5, mode="recency",
        spa=False, domain=config.domain(),
    )  # fmt: skip
    assert "The user is a female. Her plan is free. Her country is Peru." in prompt.text


def test_a_field_the_user_file_lacks_or_a_clash_is_refused(books: Path) -> None:
    bad = load_config(books).model_copy(update={"profile_fields": ["country", "tier"]})
    with pytest.raises(DataError, match=r"books.user: missing required column\(s\) \['tier'\]"):
        read_dataset(books, bad)
    for clash in (["gender"], ["user_id"], ["country", "country"], ["not a name"]):
        with pytest.raises(ValueError, match="profile_fields"):
            DatasetConfig(gender_field="gender", profile_fields=clash)


def test_din_embeds_the_fields_and_keeps_them_through_save(books: Path, tmp_path: Path) -> None:
    from training.crm.crm import main

    metrics = main(CRMConfig(dataset=str(books), out=str(tmp_path / "din"), max_epochs=2, batch_size=128))
    din = DIN.load(tmp_path / "din")
    # u039's "unknown" is a value of its own, as for gender; row 0 is for values training never saw.
    assert list(din.vocab.extra) == ["country", "plan"]
    assert set(din.vocab.extra["country"]) == {*COUNTRIES, "unknown"}
    assert din.config.n_extra == (5, 4) and len(din.extra_emb) == 2
    assert metrics["baselines"]  # the one-hot baselines take the extra columns too
    profiles = [Profile("female", extra=(("country", c), ("plan", "free"))) for c in (*COUNTRIES, "Mars")]
    batch = encode_batch(din.vocab, [2] * 4, profiles, [5] * 4, ["poetry"] * 4, [([3, 4], [5.0, 1.0])] * 4)
    assert batch.extra[:, 0].tolist() == [1, 3, 2, 0]  # sorted values from row 1; unseen -> 0
    with torch.no_grad():
        logits = din(batch).numpy()
    assert len(set(np.round(logits, 6))) == 4  # the country moves DIN's score
    saved = json.loads((tmp_path / "din" / "vocab.json").read_text())
    assert saved["extra"]["plan"] == ["free", "premium", "unknown"]
    # `rellax load-history` hands the same profiles to Redis, under the data's own user ids.
    from service.cli import history_records

    records, _ = history_records(("train", "valid"), books)
    by_key = {r.user_id: r.profile for r in records}
    assert by_key["u001"] == Profile("female", extra=(("country", "Peru"), ("plan", "free")))


def test_a_vocab_without_fields_writes_what_it_always_wrote() -> None:
    vocab = DINVocab.build([1], [1], ["a"], ["male"], ["18-24"], ["writer"])
    assert "extra" not in vocab.to_json() and "n_extra" not in vocab.sizes()
    assert "n_extra" not in DINConfig(**vocab.sizes()).to_json()
    model = DIN(DINConfig(**vocab.sizes()), vocab)
    assert not any(k.startswith("extra_emb") for k in model.state_dict())


async def test_the_store_keeps_the_fields_and_replaces_a_profile_whole(store: HistoryStore) -> None:
    uid = "profile-fields-user"
    await store.set_profile(uid, Profile("female", extra=(("country", "Peru"), ("plan", "free"))))
    assert (await store.fetch(uid)).profile == Profile(
        "female", extra=(("country", "Peru"), ("plan", "free"))
    )
    await store.set_profile(uid, Profile("male"))  # PUT replaces: the old fields are gone
    assert (await store.fetch(uid)).profile == Profile("male")
    # `rellax load-history` writes through the bulk loader: the same fields, the same layout.
    loaded = Profile("female", extra=(("country", "Japan"), ("plan", "premium")))
    assert await store.bulk_load([UserRecord("bulk-" + uid, loaded)]) == 1
    assert (await store.fetch("bulk-" + uid)).profile == loaded


async def test_the_api_refuses_a_field_the_bundle_does_not_have(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.put(
            "/v1/users/u-extra/profile", json={"gender": "male", "extra": {"country": "Peru"}}
        )
        bad_value = await client.put("/v1/users/u-extra/profile", json={"extra": {"country": "<script>"}})
        stored = (await client.get("/v1/users/u-extra/history")).json()["profile"]
    assert r.status_code == 422 and r.json()["error"]["param"] == "extra.country"
    assert "not a profile field of this bundle's data set (it has none)" in r.text
    assert bad_value.status_code == 422 and stored is None
