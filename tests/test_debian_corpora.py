"""Tests for checkfree.data.debian: the fortunes and pydocs readers, their config checks, and loading them.

Every file is written into tmp_path: CI has neither the fortunes nor the python3.11-doc package.
"""

from __future__ import annotations

import random
from dataclasses import fields, replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from checkfree.data.corpora import DataConfig, check_data_files, validate_data_config
from checkfree.data.debian import (
    DEBIAN_CORPORA,
    cookie_files,
    read_fortunes,
    read_pydocs,
    rst_files,
    split_cookies,
    split_sections,
)
from checkfree.data.loading import (
    load_corpus,
    load_documents,
    load_tokenizer,
    pack_documents,
    split_documents,
)
from checkfree.run.config import ConfigError
from checkfree.run.runconfig import load_run_config
from tests.conftest import small_run_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
WORDS = ("the cat sat on a warm mat while rain fell over quiet hills and old friends told long stories "
         "about ships lanterns rivers bread clocks gardens").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


# ----------------------------------------------------------------------------------------------- fortunes

def test_split_cookies_gives_the_text_between_percent_lines() -> None:
    data = (b"A fool and his money.\n\t\t-- Proverb\n%\n"
            b"Two\nlines\n%\n"
            b"%\n"                               # an empty cookie is dropped
            b"100% sure\n%%\n% not a separator\n%\n"  # only a line of exactly "%" separates
            b"Caf\xc3\xa9 in UTF-8\n%\n"
            b"Caf\xe9 in Latin-1\n%\n"
            b"last one, no closing percent\n")
    assert split_cookies(data) == [
        "A fool and his money.\n\t\t-- Proverb",
        "Two\nlines",
        "100% sure\n%%\n% not a separator",
        "Café in UTF-8",
        "Café in Latin-1",
        "last one, no closing percent",
    ]


def test_fortunes_reads_cookie_files_in_name_order_and_skips_the_rest(tmp_path: Path) -> None:
    (tmp_path / "b-file").write_text("b one\n%\nb two\n%\n", encoding="utf-8")
    (tmp_path / "a-file").write_text("a one\n%\na two\n%\n", encoding="utf-8")
    (tmp_path / "a-file.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (tmp_path / "a-file.u8").symlink_to("a-file")
    (tmp_path / "b-file.u8").write_text("b copy\n%\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("hidden\n%\n", encoding="utf-8")
    for sub in ("off", "de"):  # offensive cookies (fortunes-off) and other languages (fortunes-de)
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "cookies").write_text(f"{sub} cookie\n%\n", encoding="utf-8")
    assert cookie_files(tmp_path) == [tmp_path / "a-file", tmp_path / "b-file"]
    assert read_fortunes(tmp_path) == ["a one", "a two", "b one", "b two"]
    assert read_fortunes(tmp_path / "b-file") == ["b one", "b two"]  # one cookie file is a corpus too


def test_fortunes_documents_drop_duplicates_and_take_the_first_n(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("same\n%\nfirst\n%\n", encoding="utf-8")
    (tmp_path / "b").write_text("same\n%\nsecond\n%\n", encoding="utf-8")
    cfg = DataConfig(name="fortunes", path=str(tmp_path), n_documents=0, val_documents=1)
    assert load_documents(cfg) == ["same", "first", "second"]
    assert load_documents(replace(cfg, n_documents=3)) == ["same", "first"]  # the 3rd, a repeat, is dropped


def test_latin1_cookie_file_passes_the_preflight_file_check(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"Caf\xe9\n%\n")
    check_data_files(DataConfig(name="fortunes", path=str(tmp_path / "old")))  # the reader decodes it


# ----------------------------------------------------------------------------------------------- pydocs

PAGE = """\
.. _top-label:

=========
 The Top
=========

Intro paragraph of the page.

Example::

    Not a heading
    -------------

A paragraph line that is long
-----

=====  =====
col a  col b
=====  =====
1      2
=====  =====

----------

.. _second-label:

Second section
==============

Body two.
Text directly above
Not a title either
~~~~~~~~~~~~~~~~~~

Sub *one*
^^^^^^^^^
Body three.

Chained
=======
Right below
-----------
Body five.
"""


def test_split_sections_cuts_at_titles_only() -> None:
    assert split_sections(PAGE, min_chars=0) == [
        ".. _top-label:\n\n=========\n The Top\n=========\n\nIntro paragraph of the page.\n\nExample::\n\n"
        "    Not a heading\n    -------------\n\nA paragraph line that is long\n-----\n\n=====  =====\n"
        "col a  col b\n=====  =====\n1      2\n=====  =====\n\n----------",
        ".. _second-label:\n\nSecond section\n==============\n\nBody two.\nText directly above\n"
        "Not a title either\n~~~~~~~~~~~~~~~~~~",
        "Sub *one*\n^^^^^^^^^\nBody three.",
        "Chained\n=======",
        "Right below\n-----------\nBody five.",
    ]


def test_split_sections_merges_short_sections_into_the_next() -> None:
    long_a, long_b = "a" * 250, "b" * 250
    page = (f"Short one\n=========\n\ntiny.\n\nLong one\n========\n\n{long_a}\n\n"
            f"Long two\n--------\n\n{long_b}\n\nShort end\n---------\n\nbye.\n")
    assert split_sections(page) == [
        f"Short one\n=========\n\ntiny.\n\nLong one\n========\n\n{long_a}",
        f"Long two\n--------\n\n{long_b}\n\nShort end\n---------\n\nbye.",
    ]
    assert split_sections("Only\n====\n\nsmall page.\n") == ["Only\n====\n\nsmall page."]  # kept, not dropped


def test_pydocs_reads_rst_sources_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "json.rst.txt").write_text("Json\n====\n\n" + "j" * 300, encoding="utf-8")
    (tmp_path / "about.rst.txt").write_text("About\n=====\n\n" + "a" * 300, encoding="utf-8")
    (tmp_path / "about.html").write_text("<html>not a source</html>", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a source either", encoding="utf-8")
    assert rst_files(tmp_path) == [tmp_path / "about.rst.txt", tmp_path / "library" / "json.rst.txt"]
    assert read_pydocs(tmp_path) == ["About\n=====\n\n" + "a" * 300, "Json\n====\n\n" + "j" * 300]


# ----------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("name, what, package", [
    ("fortunes", "cookie files", "fortunes"),
    ("pydocs", "reStructuredText sources (*.rst.txt)", "python3.11-doc"),
])
def test_missing_directory_names_key_value_and_apt_line(name: str, what: str, package: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "not-installed"
    expected = (f"data.path={missing} does not exist: data={name} reads the Debian package's {what}; install "
                f'them with "apt-get install {package}" (or point data.path at a copy).')
    with pytest.raises(ConfigError) as err:
        validate_data_config(DataConfig(name=name, path=str(missing), n_documents=0))
    assert str(err.value) == expected

    def must_not_read(root: Path) -> list[str]:
        raise AssertionError("the corpus was read before its config was checked")

    monkeypatch.setitem(DEBIAN_CORPORA, name, replace(DEBIAN_CORPORA[name], read=must_not_read))
    with pytest.raises(ConfigError) as err:  # a run is refused when its config is loaded (the one gate)
        load_run_config(small_run_dict(str(tmp_path), data={"name": name, "path": str(missing)}))
    assert str(err.value) == expected


def test_directories_without_sources_are_refused(tmp_path: Path) -> None:
    cookies = tmp_path / "fortunes"
    (cookies / "off").mkdir(parents=True)
    (cookies / "off" / "rude").write_text("left out\n%\n", encoding="utf-8")
    (cookies / "art.dat").write_bytes(b"\x00\x00")
    (cookies / "art.u8").symlink_to("art")  # dangling: the cookie file itself is missing
    with pytest.raises(ConfigError) as err:
        validate_data_config(DataConfig(name="fortunes", path=str(cookies), n_documents=0))
    assert str(err.value).startswith(f"data.path={cookies} holds no cookie files: ")
    assert '"apt-get install fortunes"' in str(err.value)

    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "index.html").write_text("<html></html>", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        validate_data_config(DataConfig(name="pydocs", path=str(sources), n_documents=0))
    assert str(err.value).startswith(f"data.path={sources} holds no reStructuredText sources (*.rst.txt): ")
    assert '"apt-get install python3.11-doc"' in str(err.value)


def test_a_null_path_is_refused_with_the_apt_line() -> None:
    with pytest.raises(ConfigError, match=r'data.path=None is invalid: .*"apt-get install fortunes"'):
        validate_data_config(DataConfig(name="fortunes", n_documents=0))


# ----------------------------------------------------------------------------------------------- end to end

def _fake_fortunes(root: Path) -> Path:
    rng = random.Random(0)
    root.mkdir()
    for name in ("art", "kids", "science"):
        cookies = [f"{_sentence(rng, 8)} {_sentence(rng, 6)}\n\t\t-- {name.title()} {i}" for i in range(60)]
        (root / name).write_text("\n%\n".join(cookies) + "\n%\n", encoding="utf-8")
        (root / f"{name}.dat").write_bytes(b"\x00\x01index")
        (root / f"{name}.u8").symlink_to(name)
    (root / "repeats").write_text("A cookie in two files.\n%\n", encoding="utf-8")
    (root / "science-again").write_text("A cookie in two files.\n%\n", encoding="utf-8")
    return root


def _fake_pydocs(root: Path) -> Path:
    rng = random.Random(1)
    for page in ("library/json", "library/os", "tutorial/intro"):
        sections = [f"Section {page} {i}\n{'=' * 40}\n\n" + " ".join(_sentence(rng, 10) for _ in range(6))
                    + "\n\nExample::\n\n    x = 1\n    -----\n" for i in range(15)]
        path = root / f"{page}.rst.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(sections), encoding="utf-8")
    return root


@pytest.mark.parametrize("name, make", [("fortunes", _fake_fortunes), ("pydocs", _fake_pydocs)])
def test_load_corpus_holds_out_validation_documents_from_training_and_tokenizer(
        name: str, make, tmp_path: Path, data_cache: str) -> None:
    cfg = DataConfig(name=name, path=str(make(tmp_path / name)), n_documents=0, val_documents=8,
                     val_sequences=4, vocab_size=300, cache_dir=data_cache)
    corpus = load_corpus(cfg, seq_len=16)
    docs = load_documents(cfg)
    train, val = split_documents(docs, cfg)
    assert (corpus.n_train_documents, corpus.n_val_documents) == (len(docs) - 8, 8)
    assert not set(val) & set(train) and len(set(docs)) == len(docs)
    # The validation sequences are cut from the held-out documents.
    width = 17
    assert corpus.val.tolist() == pack_documents(val, corpus.tokenizer)[: 4 * width].view(4, width).tolist()
    # The tokenizer is the one a BPE trained on the training documents gives, and training it on the held-out
    # documents as well gives another one: so a leak would show.
    on_train = load_tokenizer(replace(cfg, cache_dir=str(tmp_path / "train-only")), train)
    on_all = load_tokenizer(replace(cfg, cache_dir=str(tmp_path / "all")), train + val)
    assert on_train.get_vocab() != on_all.get_vocab()
    assert corpus.tokenizer.get_vocab() == on_train.get_vocab()
    # Read from a copy, not from where the package installs its files: no package version can be claimed.
    packages = {"fortunes": ("fortunes", "fortunes-min"), "pydocs": ("python3.11-doc",)}[name]
    assert corpus.packages == dict.fromkeys(packages, f"unknown (a copy at {cfg.path})")


# ----------------------------------------------------------------------------------------------- Hydra

@pytest.mark.parametrize("name", ["fortunes", "pydocs"])
def test_hydra_config_composes_with_the_debian_path(name: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data={name}"])
    assert list(cfg.data) == [f.name for f in fields(DataConfig)]
    assert (cfg.data.name, cfg.data.path) == (name, DEBIAN_CORPORA[name].default_path)
    assert OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"))["n_documents"] == 0
    # The whole run validates once data.path points at a copy (CI has no Debian packages).
    copy = _fake_fortunes(tmp_path / "copy") if name == "fortunes" else _fake_pydocs(tmp_path / "copy")
    cfg.data.path = str(copy)
    run = load_run_config(cfg)
    assert (run.data.name, run.data.path) == (name, str(copy))
