"""Tests for checkfree.data.loading: synthetic stories, disjoint splits, EOS packing, resumable batches, caches, loaders."""

from __future__ import annotations

import io
import json
import re
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from checkfree.data.corpora import CORPORA, DataConfig, validate_data_config
from checkfree.data.loading import (
    TokenBatches,
    load_corpus,
    load_documents,
    load_tokenizer,
    pack_documents,
    split_documents,
)
from checkfree.data.stories import BOYS, COLOURS, GIRLS, OBJECTS, PET_KINDS, PET_NAMES, PETS, generate_stories
from checkfree.run.config import ConfigError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    cache = tmp_path_factory.mktemp("cache")
    return DataConfig(n_documents=600, val_documents=50, val_sequences=32, vocab_size=300, cache_dir=str(cache))


@pytest.fixture(scope="module")
def corpus(cfg: DataConfig):
    return load_corpus(cfg, seq_len=SEQ_LEN, batch_seed=7)


@pytest.fixture(scope="module")
def split(cfg: DataConfig) -> tuple[list[str], list[str]]:
    return split_documents(load_documents(cfg), cfg)


def _words(pattern_words: tuple[str, ...] | list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(pattern_words) + r")\b")


# ----------------------------------------------------------------------------------------------- stories

def test_generate_stories_is_deterministic_per_seed() -> None:
    a, b, c = generate_stories(200, seed=1), generate_stories(200, seed=1), generate_stories(200, seed=2)
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) == 200
    assert generate_stories(20, seed=1) == a[:20]  # a shorter corpus is a prefix of a longer one
    assert len(set(a)) == 200
    lengths = sorted(len(s.split()) for s in generate_stories(2000, seed=4))
    assert 40 <= lengths[0] and lengths[-1] <= 155 and 80 <= lengths[1000] <= 130


def test_stories_keep_their_characters_and_attributes() -> None:
    names, pets, pet_names = _words(GIRLS + BOYS), _words(PET_KINDS), _words(PET_NAMES)
    toys = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(OBJECTS) + r")\b")
    sounds = _words(tuple(PETS.values()))
    for story in generate_stories(300, seed=3):
        hero = names.search(story).group(1)  # the first name in a story is its hero
        assert len(re.findall(rf"\b{hero}\b", story)) >= 3, story
        assert len(set(pets.findall(story))) == 1, story  # one pet kind, referred back to consistently
        pet = pets.search(story).group(1)
        assert len(set(pet_names.findall(story))) == 1 and len(pet_names.findall(story)) >= 2, story
        assert len(set(toys.findall(story))) == 1, story  # the toy keeps its colour
        toy = toys.search(story).group(2)
        assert len(re.findall(rf"\b{toy}\b", story)) >= 2, story  # and is referred back to
        assert set(sounds.findall(story)) <= {PETS[pet]}, story  # a dog barks, it never meows


# ----------------------------------------------------------------------------------------------- splits and packing

def test_split_is_disjoint_and_seeded(cfg: DataConfig, split: tuple[list[str], list[str]]) -> None:
    train, val = split
    assert (len(train), len(val)) == (550, 50)
    assert not set(train) & set(val)
    other_train, other_val = split_documents(load_documents(cfg), replace(cfg, seed=cfg.seed + 1))
    assert set(other_val) != set(val) and set(other_train) | set(other_val) == set(train) | set(val)


def test_val_sequences_are_packed_from_val_documents_only(corpus, split, cfg: DataConfig) -> None:
    train, val = split
    assert corpus.val.shape == (32, SEQ_LEN + 1) and corpus.val.dtype == torch.int64
    expected = pack_documents(val, corpus.tokenizer)[: 32 * (SEQ_LEN + 1)].view(32, SEQ_LEN + 1).long()
    assert torch.equal(corpus.val, expected)
    # Every complete document inside the validation stream is a validation document.
    eos = corpus.tokenizer.eos_token_id
    stream = corpus.val.flatten().tolist()
    cuts = [i for i, t in enumerate(stream) if t == eos]
    inner = [corpus.tokenizer.decode(stream[a + 1: b]) for a, b in zip(cuts, cuts[1:])]
    assert inner and all(doc in set(val) for doc in inner)
    assert not set(inner) & set(train)


def test_documents_are_separated_by_eos(corpus, split) -> None:
    docs = split[0][:3]
    tokens = pack_documents(docs, corpus.tokenizer).tolist()
    eos = corpus.tokenizer.eos_token_id
    assert tokens.count(eos) == 3 and tokens[-1] == eos
    cuts = [-1] + [i for i, t in enumerate(tokens) if t == eos]
    assert [corpus.tokenizer.decode(tokens[a + 1: b]) for a, b in zip(cuts, cuts[1:])] == docs


def test_corpus_sizes(corpus, cfg: DataConfig) -> None:
    assert (corpus.n_train_documents, corpus.n_val_documents) == (550, 50)
    assert corpus.vocab_size == len(corpus.tokenizer) == 300
    assert corpus.train.tokens_per_epoch == corpus.train.n_sequences * (SEQ_LEN + 1)
    assert int(corpus.val.max()) < corpus.vocab_size


# ----------------------------------------------------------------------------------------------- batches

def _stream(corpus, cfg: DataConfig, seed: int) -> TokenBatches:
    """A fresh training stream over the same packed tokens as the fixture's corpus."""
    return load_corpus(cfg, seq_len=SEQ_LEN, batch_seed=seed).train


def test_next_batch_rows_are_contiguous_training_sequences(corpus, split) -> None:
    tokens = pack_documents(split[0], corpus.tokenizer).long()
    width = SEQ_LEN + 1
    rows = tokens[: tokens.numel() // width * width].view(-1, width)
    batch = corpus.train.next_batch(5)
    assert batch.shape == (5, width) and batch.dtype == torch.int64
    for row in batch:  # each row is one aligned chunk of the stream, so targets x[1:] follow inputs x[:-1]
        assert bool((rows == row).all(dim=1).any())


def test_an_epoch_serves_every_sequence_once(cfg: DataConfig, corpus) -> None:
    stream = _stream(corpus, cfg, seed=3)
    n = stream.n_sequences
    served = torch.cat([stream.next_batch(7) for _ in range((n + 6) // 7)])
    first_epoch = served[:n]
    assert stream.epoch >= 1 and stream.index == served.shape[0] - n
    assert torch.unique(first_epoch, dim=0).shape[0] == torch.unique(stream._rows, dim=0).shape[0]
    second = stream.next_batch(n - stream.index)
    assert not torch.equal(torch.cat([served[n:], second]), first_epoch)  # epochs are reshuffled


def test_state_dict_round_trip_resumes_exactly(cfg: DataConfig, corpus) -> None:
    stream = _stream(corpus, cfg, seed=5)
    size = stream.n_sequences // 4 + 1
    for _ in range(3):
        stream.next_batch(size)
    state = stream.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert json.loads(json.dumps(state)) == state == torch.load(buffer, weights_only=True)
    expected = [stream.next_batch(size) for _ in range(5)]  # crosses an epoch boundary
    assert stream.epoch >= 1
    resumed = _stream(corpus, cfg, seed=99)  # the stream's seed comes back with its state
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(size), e) for e in expected)


def test_load_state_dict_rejects_another_corpus(cfg: DataConfig, corpus) -> None:
    state = dict(corpus.train.state_dict(), n_sequences=corpus.train.n_sequences + 1)
    with pytest.raises(ValueError, match="n_sequences"):
        corpus.train.load_state_dict(state)


def test_batch_seed_sets_the_order(cfg: DataConfig, corpus) -> None:
    a, b, c = (_stream(corpus, cfg, seed=s) for s in (11, 11, 12))
    batches = [torch.cat([s.next_batch(8) for _ in range(3)]) for s in (a, b, c)]
    assert torch.equal(batches[0], batches[1])
    assert not torch.equal(batches[0], batches[2])


def test_token_batches_rejects_too_short_corpus() -> None:
    with pytest.raises(ConfigError, match="model.seq_len"):
        TokenBatches(torch.arange(10, dtype=torch.int32), seq_len=32)


# ----------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_and_tokens_are_cached_and_reused(cfg: DataConfig, corpus) -> None:
    files = sorted(Path(cfg.cache_dir).glob("*/*"))
    assert [f.parent.name for f in files] == ["tokenizers", "tokens"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = load_corpus(cfg, seq_len=SEQ_LEN, batch_seed=7)
    assert sorted(Path(cfg.cache_dir).glob("*/*")) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    text = "Lily had a red kite."
    assert again.tokenizer(text)["input_ids"] == corpus.tokenizer(text)["input_ids"]
    assert torch.equal(again.val, corpus.val)
    bigger = load_corpus(replace(cfg, vocab_size=320), seq_len=SEQ_LEN)
    assert bigger.vocab_size == 320 and len(list(Path(cfg.cache_dir).glob("tokenizers/*.json"))) == 2


def test_bpe_keeps_special_tokens_and_round_trips(corpus) -> None:
    tok = corpus.tokenizer
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    text = "Zoe's café — naïve 123!"  # bytes never seen in training still round-trip
    assert tok.decode(tok(text)["input_ids"]) == text


def test_pretrained_tokenizer_from_a_local_directory(cfg: DataConfig, corpus, tmp_path: Path) -> None:
    corpus.tokenizer.save_pretrained(tmp_path / "tok")
    other = load_corpus(replace(cfg, tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path / "c")), seq_len=SEQ_LEN)
    assert other.tokenizer.eos_token_id == corpus.tokenizer.eos_token_id
    assert torch.equal(other.val, corpus.val)


# ----------------------------------------------------------------------------------------------- local files

def _local(tmp_path: Path, name: str, path: Path, **kw) -> DataConfig:
    return DataConfig(name=name, path=str(path), n_documents=0, cache_dir=str(tmp_path / "cache"), **kw)


def test_text_file_blank_line_documents_and_directory_of_files(tmp_path: Path) -> None:
    docs = ["First doc,\nwith two lines.", "Second doc.", "Third doc.", "Fourth\ndoc."]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n\n\n", encoding="utf-8")
    assert load_documents(_local(tmp_path, "text", tmp_path / "corpus.txt")) == docs
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, doc in enumerate(docs + ["Fifth\n\nwith a blank line."]):
        (folder / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    got = load_documents(_local(tmp_path, "text", folder))
    assert len(got) == 5 and got[4] == "Fifth\n\nwith a blank line."


def test_jsonl_json_array_and_parquet_files_load(tmp_path: Path) -> None:
    docs = [f"Story number {i}. " + " ".join(generate_stories(1, seed=i)) for i in range(120)]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs[:30]]), encoding="utf-8")
    pd.DataFrame({"body": docs, "n": range(120)}).to_parquet(tmp_path / "c.parquet")
    assert load_documents(_local(tmp_path, "json", tmp_path / "a.jsonl", text_field="body")) == docs
    assert load_documents(_local(tmp_path, "json", tmp_path / "b.json", text_field="body")) == docs[:30]
    pq = _local(tmp_path, "parquet", tmp_path / "c.parquet", text_field="body", val_documents=20,
                val_sequences=4, vocab_size=280)
    assert load_documents(replace(pq, n_documents=50)) == docs[:50]
    c = load_corpus(pq, seq_len=SEQ_LEN)
    assert (c.n_train_documents, c.n_val_documents) == (100, 20)


def test_local_copy_of_a_hub_corpus(tmp_path: Path) -> None:
    import datasets

    docs = [f"Story {i}: " + s for i, s in enumerate(generate_stories(60, seed=9))]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    pd.DataFrame({"text": docs}).to_parquet(tmp_path / "ts.parquet")
    for path in (tmp_path / "saved", tmp_path / "ts.parquet"):
        cfg = DataConfig(name="tinystories", path=str(path), n_documents=40, val_documents=5,
                         cache_dir=str(tmp_path / "cache"))
        assert load_documents(cfg) == docs[:40]


def test_missing_field_names_file_field_and_columns(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_documents(_local(tmp_path, "json", tmp_path / "a.jsonl"))
    assert all(s in str(err.value) for s in ("data.text_field='text'", "a.jsonl", "body", "id"))


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2 could not be read as json"):
        load_documents(_local(tmp_path, "json", tmp_path / "bad.jsonl"))


def test_non_text_field_is_rejected(tmp_path: Path) -> None:
    pd.DataFrame({"text": [1, 2, 3]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(ConfigError, match="holds int values"):
        load_documents(_local(tmp_path, "parquet", tmp_path / "n.parquet"))


def test_too_few_val_sequences_suggests_a_fix(cfg: DataConfig) -> None:
    with pytest.raises(ConfigError, match="data.val_sequences=50.*raise data.val_documents"):
        load_corpus(replace(cfg, val_sequences=50, val_documents=2), seq_len=SEQ_LEN)


# ----------------------------------------------------------------------------------------------- validation

def test_unknown_corpus_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        validate_data_config(DataConfig(name="wikitext"))
    assert "data.name='wikitext'" in str(err.value) and all(n in str(err.value) for n in CORPORA)


@pytest.mark.parametrize("change, key", [
    ({"name": "text"}, "data.path"),
    ({"name": "json", "path": "/no/such/file.jsonl"}, "data.path='/no/such/file.jsonl'"),
    ({"path": "/no/such/dir"}, "data.path"),
    ({"vocab_size": 200}, "data.vocab_size=200"),
    ({"val_documents": 0}, "data.val_documents=0"),
    ({"val_sequences": 0}, "data.val_sequences=0"),
    ({"n_documents": -1}, "data.n_documents=-1"),
    ({"n_documents": 500, "val_documents": 500}, "data.n_documents=500"),
    ({"name": "tinystories", "n_documents": 10, "val_documents": 10}, "data.n_documents=10"),
    ({"text_field": ""}, "data.text_field"),
])
def test_bad_data_configs_are_rejected(change: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_data_config(DataConfig(**change))
    assert key in str(err.value)


def test_directory_without_matching_files_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="no .parquet files"):
        validate_data_config(DataConfig(name="parquet", path=str(tmp_path)))


def test_valid_configs_pass() -> None:
    validate_data_config(DataConfig())
    validate_data_config(DataConfig(name="openwebtext", n_documents=0, tokenizer="gpt2"))


# ----------------------------------------------------------------------------------------------- hub (offline)

@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make hub calls fail at once: the flags are read at import time, so patch the module constants too."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hub_failure_is_a_clear_config_error(offline: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_documents(DataConfig(name="tinystories", cache_dir=str(tmp_path)))
    assert "data.name=tinystories could not be loaded from the Hugging Face hub" in str(err.value)
    assert "data.path=" in str(err.value)


def test_unloadable_tokenizer_is_a_clear_config_error(offline: None, cfg: DataConfig) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer='no-such/tokenizer-xyz'"):
        load_tokenizer(replace(cfg, tokenizer="no-such/tokenizer-xyz"), [])


# ----------------------------------------------------------------------------------------------- Hydra configs

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.mark.parametrize("name", ["synthetic", "tinystories", "openwebtext", "local_text", "local_json",
                                  "local_parquet"])
def test_conf_files_hold_exactly_the_data_config_fields(name: str, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    conf = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(conf) == [f.name for f in fields(DataConfig)]
    values = OmegaConf.to_container(conf, resolve=False)
    if values["path"] == "???":  # mandatory: the user gives data.path
        (tmp_path / "x.txt").write_text("x", encoding="utf-8")
        values["path"] = str(tmp_path / "x.txt")
    cfg = DataConfig(**values)
    validate_data_config(cfg)
    if name == "synthetic":
        assert cfg == DataConfig()
