"""A user's own data set: RecBole atomic files + dataset.toml, read by the one reader, with errors
that name the file, line and field, and the prompt that domain gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.config import ML100K, load_config
from data.dataset import read_dataset
from data.loading import dataset_key, read_source
from data.samples import load_or_build_samples
from rellax.domain import MOVIES
from rellax.entities import Item, Profile
from rellax.errors import DataError
from rellax.prompt import build_item_prompt, build_prompt, build_user_prompt
from tests.domain_support import write_books

GOLDEN_BOOKS = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "The user read the following books in order in the past, and rated them:\n"
    "['0. Salt Map 12 (disliked) [hist]', '1. North Glass 3 (liked) [hist]']\n"
    "Based on the books the user has read, deduce if the user will like the book ***Iron Letters 7*** "
    "[target].\n"
    "You should ONLY tell me yes or no.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture()
def books(tmp_path: Path) -> Path:
    return write_books(tmp_path / "books")


def _read(folder: Path):  # noqa: ANN202
    return read_dataset(folder, load_config(folder))


def test_books_tables(books: Path, tmp_path: Path) -> None:
    data = _read(books)
    assert data.name == "books"
    # String ids are numbered 1..N in sorted order and map back.
    assert data.item_keys is not None and data.item_keys[1] == "b0000"
    assert data.user_keys is not None and data.user_key(1) == "u000"
    assert sorted(data.items.item_id) == list(range(1, 61))
    # Labels are stored as ratings 5 / 1 so label = rating > 3 holds everywhere.
    assert set(data.interactions.rating) == {1.0, 5.0}
    assert data.profile(1) == Profile()
    assert data.items.genre.iloc[0] == "mystery"  # first token of the category field
    assert data.domain.profile == () and data.domain.rating == "label" and data.domain.noun == "book"
    samples, manifest = load_or_build_samples(data, tmp_path / "samples")
    assert manifest["dataset"] == "books" and manifest["catalogue_items"] == 60
    for split in ("train", "valid", "test"):
        idx = samples.indices(split)
        assert len(idx) and samples.label[idx].any() and not samples.label[idx].all()
    # The label read from the file is the label of the sample.
    raw = [line.split("\t") for line in (books / "books.inter").read_text().splitlines()[1:]]
    positives = sum(int(r[2]) for r in raw)
    assert int((data.interactions.rating > data.label_threshold).sum()) == positives


def test_bundled_ml100k_goes_through_the_same_reader() -> None:
    data = read_source(None)
    assert data.config == ML100K and data.domain == MOVIES and dataset_key(data) == "ml100k"
    assert data.item_keys is None  # integer ids are served as they are


def test_books_prompt_is_golden(books: Path, soft_tokenizer) -> None:  # noqa: ANN001
    domain = _read(books).domain
    history = [(Item(13, "Salt Map 12", "poetry"), 1.0), (Item(4, "North Glass 3", "poetry"), 5.0)]
    prompt = build_prompt(
        soft_tokenizer, Profile(), history, Item(8, "Iron Letters 7", "history"), k=5, mode="recency",
        spa=True, domain=domain,
    )  # fmt: skip
    assert prompt.text == GOLDEN_BOOKS
    assert len(prompt.hist_positions) == 2 and prompt.target_position is not None
    assert prompt.input_ids == soft_tokenizer(GOLDEN_BOOKS, add_special_tokens=False)["input_ids"]
    assert domain.describe(Item(8, "Iron Letters 7", "history")) == (
        "Here is a book. Its title is Iron Letters 7. Its categories are history."
    )
    user = build_user_prompt(
        soft_tokenizer, [(Item(4, "North Glass 3", "poetry"), 1_600_000_000)], domain=domain
    )
    assert (
        user.text.startswith("A user read these books") and "The book this user will read next" in user.text
    )
    assert (
        "a history book"
        in build_item_prompt(soft_tokenizer, Item(8, "Iron Letters 7", "history"), domain).text
    )


def test_own_split_is_kept(books: Path, tmp_path: Path) -> None:
    lines = (books / "books.inter").read_text().splitlines()
    header, rows = lines[0] + "\tsplit:token", lines[1:]
    names = ["train"] * 7 + ["valid", "test", "test"]
    rows = [f"{r}\t{names[int(r.split(chr(9))[3]) % 10]}" for r in rows]  # timestamps are unique
    (books / "books.inter").write_text("\n".join([header, *rows]) + "\n")
    (books / "dataset.toml").write_text((books / "dataset.toml").read_text().replace(
        'category_field = "categories"', 'category_field = "categories"\nsplit_field = "split"'
    ))  # fmt: skip
    data = _read(books)
    samples, _ = load_or_build_samples(data, tmp_path / "samples")
    want = {"train": 0, "valid": 1, "test": 2}
    stamp_split = {int(r.split("\t")[3]): want[r.split("\t")[4]] for r in rows}  # unique stamps
    got = [stamp_split[int(t)] for t in samples.timestamp]
    np.testing.assert_array_equal(samples.split, got)


def _edit(folder: Path, name: str, old: str, new: str) -> None:
    path = folder / name
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("books.inter", "label:float", "score:float", r"books.inter: missing required column\(s\) \['label"),
        ("books.item", "title:token_seq", "title:text", r"books.item: line 1, field 'title': unknown type"),
        ("books.item", "b0000\t", "x0000\t", r"books.inter: line \d+, field 'item_id': item 'b0000' is"),
        ("books.inter", "\t1\t16", "\tyes\t16", r"books.inter: line \d+, field 'label': 'yes' is not a"),
        ("books.inter", "\t1\t16", "\t2\t16", r"books.inter: line \d+, field 'label': label '2' is not 0"),
        ("dataset.toml", 'label_field = "label"', 'label_feld = "label"', r"dataset.toml: label_feld: Extra"),
    ],
)
def test_bad_files_name_file_line_and_field(
    books: Path, tmp_path: Path, file: str, old: str, new: str, message: str
) -> None:
    _edit(books, file, old, new)
    cache = tmp_path / "samples"
    with pytest.raises(DataError, match=message):
        load_or_build_samples(_read(books), cache)
    assert not cache.exists()  # nothing written


def test_non_numeric_rating(books: Path) -> None:
    text = (books / "books.inter").read_text().replace("label:float", "rating:float", 1)
    lines = text.splitlines()
    lines[3] = "\t".join([*lines[3].split("\t")[:2], "four", lines[3].split("\t")[3]])
    (books / "books.inter").write_text("\n".join(lines) + "\n")
    (books / "dataset.toml").write_text(
        (books / "dataset.toml").read_text().replace('label_field = "label"\n', "")
    )
    with pytest.raises(DataError, match=r"books.inter: line 4, field 'rating': 'four' is not a number"):
        _read(books)


def test_duplicate_rows_are_refused_or_dropped(books: Path) -> None:
    lines = (books / "books.inter").read_text().splitlines()
    lines.insert(6, lines[5])
    (books / "books.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"books.inter: line 7: repeats \(user, item, timestamp\)"):
        _read(books)
    (books / "dataset.toml").write_text(
        (books / "dataset.toml").read_text() + '\non_duplicate = "keep_first"\n'
    )
    # TOML keys after a table header belong to it: put the key at the top instead.
    text = (books / "dataset.toml").read_text().replace('\non_duplicate = "keep_first"\n', "")
    (books / "dataset.toml").write_text('on_duplicate = "keep_first"\n' + text)
    assert len(_read(books).interactions) == len(lines) - 2


def test_a_split_without_positives_is_refused(books: Path, tmp_path: Path) -> None:
    lines = (books / "books.inter").read_text().splitlines()
    stamps = sorted(int(r.split("\t")[3]) for r in lines[1:])
    late = stamps[int(len(stamps) * 0.85)]
    rows = [
        "\t".join([*r.split("\t")[:2], "0", r.split("\t")[3]]) if int(r.split("\t")[3]) >= late else r
        for r in lines[1:]
    ]
    (books / "books.inter").write_text("\n".join([lines[0], *rows]) + "\n")
    cache = tmp_path / "samples"
    with pytest.raises(DataError, match="the test split has no positives"):
        load_or_build_samples(_read(books), cache)
    assert not cache.exists()


def test_profile_fields_without_a_user_file(books: Path) -> None:
    (books / "dataset.toml").write_text('gender_field = "gender"\n' + (books / "dataset.toml").read_text())
    with pytest.raises(DataError, match=r"books.user does not exist, but the config names profile fields"):
        _read(books)


def test_a_plain_csv_export_becomes_a_data_set(tmp_path: Path) -> None:
    """The README's worked example: two CSV files -> `rellax data from-csv` -> `data prepare`."""
    from typer.testing import CliRunner

    from cli.main import app

    rng = np.random.default_rng(1)
    rows = ["user_id,item_id,rating,timestamp"]
    for u in range(30):
        for n, i in enumerate(rng.choice(40, size=20, replace=False)):
            rows.append(f"user-{u},sku-{i},{1 + (u + int(i)) % 5},{1_600_000_000 + u * 1000 + n * 7}")
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    items = ["item_id,title,department"] + [
        f'sku-{i},"Widget, model {i}",{"garden tools" if i % 2 else "kitchen"}' for i in range(40)
    ]
    (tmp_path / "items.csv").write_text("\n".join(items) + "\n")
    out = tmp_path / "shop"
    csvs = ["--interactions", str(tmp_path / "ratings.csv"), "--items", str(tmp_path / "items.csv")]
    result = CliRunner().invoke(app, [
        "data", "from-csv", *csvs, "--out", str(out), "--name", "shop", "--noun", "product",
        "--verb", "bought", "--verb-next", "buy", "--category", "department",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = _read(out)
    assert data.domain.noun == "product" and data.domain.verb == "bought" and data.domain.rating == "stars"
    assert data.items.title.iloc[0] == "Widget, model 0" and set(data.items.genre) == {"garden", "kitchen"}
    assert len(data.interactions) == 600 and data.user_keys is not None
    samples, manifest = load_or_build_samples(data, tmp_path / "samples")
    assert manifest["dataset"] == "shop" and len(samples) == 30 * 15  # 20 each, the first 5 are history


def test_per_split_benchmark_files_keep_their_split(books: Path, tmp_path: Path) -> None:
    """RecBole's benchmark layout: NAME.train.inter / NAME.valid.inter / NAME.test.inter."""
    header, *rows = (books / "books.inter").read_text().splitlines()
    (books / "books.inter").unlink()
    rows.sort(key=lambda r: int(r.split("\t")[3]))
    cut = {"train": rows[: len(rows) * 7 // 10], "valid": rows[len(rows) * 7 // 10 : len(rows) * 8 // 10]}
    cut["test"] = rows[len(rows) * 8 // 10 :]
    for name, part in cut.items():
        (books / f"books.{name}.inter").write_text("\n".join([header, *part]) + "\n")
    data = _read(books)
    assert len(data.sources) == 4 and data.config.split_field == "split"
    samples, _ = load_or_build_samples(data, tmp_path / "samples")
    in_file = {int(r.split("\t")[3]): i for i, name in enumerate(cut) for r in cut[name]}  # unique stamps
    np.testing.assert_array_equal(samples.split, [in_file[int(t)] for t in samples.timestamp])
    # An error names the split file and its own line.
    (books / "books.valid.inter").write_text(
        "\n".join([header, *cut["valid"][:3], "u001\tb0001\tx\t5"]) + "\n"
    )
    with pytest.raises(DataError, match=r"books.valid.inter: line 5, field 'label': 'x' is not a number"):
        _read(books)
