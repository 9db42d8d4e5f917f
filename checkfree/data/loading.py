"""Training data: corpora, tokenizer, packing into fixed-length sequences, and a held-out validation split.

``load_corpus`` runs the whole path: documents (the embedded synthetic stories, a Hugging Face hub corpus,
local text/json/parquet files, or a Debian package's text: ``checkfree.data.debian``) -> exact
duplicates dropped, shuffled with the corpus seed and split into validation and training documents -> a
tokenizer (our own byte-level BPE trained on the training documents and cached, or a pretrained HF
tokenizer) -> every document tokenized with EOS appended, concatenated and cut into sequences of
``seq_len + 1`` tokens -> ``TokenBatches`` serves the training sequences in a seeded order per epoch and
resumes exactly from its ``state_dict``.

It avoids the reference code's data bugs (docs/paper.md, 'Reference-code bugs we avoid' items 9-11):
validation documents are never trained on (not even by the tokenizer), documents are separated by EOS,
and batches are drawn by index from one token tensor instead of an ever-growing ``itertools.cycle`` cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from checkfree.data import debian as debian_corpora
from checkfree.data import stories
from checkfree.data.corpora import (  # torch-free, so a config is validated without torch
    FILE_SUFFIXES,
    HUB_IDS,
    SAVED_DATASET_FILES,
    SUFFIX_BUILDERS,
    DataConfig,
    corpus_packages,
    data_files,
    find_bad_json,
)
from checkfree.data.debian import DEBIAN_CORPORA
from checkfree.data.stories import generate_stories
from checkfree.run.config import ConfigError, require

if TYPE_CHECKING:  # transformers is imported where it is used: validating a config must stay cheap
    from transformers import PreTrainedTokenizerFast

__all__ = ["TokenBatches", "Corpus", "load_corpus", "load_documents", "split_documents", "load_tokenizer",
           "pack_documents", "EOS", "PAD"]

EOS, PAD = "<|endoftext|>", "<|pad|>"
_TOKENIZE_CHUNK = 2048  # documents per tokenizer call: keeps the intermediate Python id lists small


# ----------------------------------------------------------------------------------------------- documents

def load_documents(cfg: DataConfig) -> list[str]:
    """All documents of the configured corpus (stripped, empty ones and exact duplicates dropped)."""
    if cfg.name == "synthetic":
        docs: Iterable[str] = generate_stories(cfg.n_documents, cfg.seed)
    elif cfg.name in FILE_SUFFIXES:
        docs = _file_documents(cfg)
    elif cfg.name in DEBIAN_CORPORA:
        read = DEBIAN_CORPORA[cfg.name].read(Path(cfg.path or "").expanduser())
        docs = read[: cfg.n_documents] if cfg.n_documents > 0 else read
    elif cfg.path is not None:
        docs = _local_copy_documents(cfg)
    else:
        docs = _hub_documents(cfg)
    # Dropping duplicates keeps a text repeated in the corpus (common on the web) from landing on both
    # sides of the split, which would leak validation data into training.
    return list(dict.fromkeys(text for text in (d.strip() for d in docs) if text))


def _streaming(cfg: DataConfig) -> bool:
    return cfg.streaming if cfg.streaming is not None else cfg.name == "openwebtext"


def _file_documents(cfg: DataConfig) -> Iterable[str]:
    """text/json/parquet files read through ``datasets`` (one document per record, paragraph or file)."""
    import datasets  # deferred: importing it costs about a second that the synthetic corpus never needs

    files = data_files(cfg)
    kwargs: dict[str, Any] = {}
    if cfg.name == "text":
        # A single .txt file holds many documents separated by blank lines; a directory holds one per file.
        kwargs["sample_by"] = "paragraph" if Path(cfg.path or "").expanduser().is_file() else "document"
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(cfg.name, data_files=[str(f) for f in files], split="train",
                                       streaming=_streaming(cfg), cache_dir=_hf_cache(cfg), **kwargs)
            # The text builder always names its column "text", whatever data.text_field says.
            return _column(ds, replace(cfg, text_field="text") if cfg.name == "text" else cfg, f"data.path={cfg.path}")
    except ConfigError:
        raise
    except Exception as exc:
        where = find_bad_json(files) if cfg.name == "json" else None
        raise ConfigError(f"data.path={where or cfg.path} could not be read as {cfg.name} "
                          f"({_root_cause(exc)}).") from exc


def _local_copy_documents(cfg: DataConfig) -> Iterable[str]:
    """A local copy of a hub corpus: a ``save_to_disk`` folder, a hub snapshot folder, or one data file."""
    import datasets

    path = Path(cfg.path or "").expanduser()
    try:
        with _quiet_datasets():
            if path.is_dir() and any((path / f).exists() for f in SAVED_DATASET_FILES):
                ds = datasets.load_from_disk(str(path))
                ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
            elif path.is_file():
                builder = SUFFIX_BUILDERS.get(path.suffix, "text")
                ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                           streaming=_streaming(cfg), cache_dir=_hf_cache(cfg))
            else:
                ds = datasets.load_dataset(str(path), split="train", streaming=_streaming(cfg),
                                           cache_dir=_hf_cache(cfg))
            return _column(ds, cfg, source=f"data.path={cfg.path}")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"data.path={cfg.path} could not be loaded as a copy of {HUB_IDS[cfg.name]} "
                          f"({_root_cause(exc)}).") from exc


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Local files are read with datasets' progress bars and log off: on a malformed file it logs the parse
    error and leaves a bar on stderr before raising, and our ConfigError already says it in one sentence.
    (A hub download keeps its bars: it may take minutes.)"""
    import datasets
    from datasets.utils import logging as datasets_logging

    bars_were_off, level = datasets.utils.are_progress_bars_disabled(), datasets_logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _hub_documents(cfg: DataConfig) -> Iterable[str]:
    import datasets

    try:
        # The hub's own cache (HF_HOME) is used, so a download is shared with other tools.
        ds = datasets.load_dataset(HUB_IDS[cfg.name], split="train", streaming=_streaming(cfg))
        return _column(ds, cfg, source=HUB_IDS[cfg.name])
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"data.name={cfg.name} could not be loaded from the Hugging Face hub "
                          f"({_root_cause(exc)}); download {HUB_IDS[cfg.name]} and set data.path=<local copy>.") from exc


def _column(ds: Any, cfg: DataConfig, source: str) -> list[str]:
    """The first ``n_documents`` values of ``cfg.text_field`` (all when 0), checked to be text."""
    import datasets

    columns = ds.column_names
    if columns is None:  # a streamed dataset may not know its columns until the first record is read
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    if cfg.text_field not in columns:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of {source}: "
                          f"available columns are {sorted(columns)}.")
    if isinstance(ds, datasets.IterableDataset):
        ds = ds.take(cfg.n_documents) if cfg.n_documents > 0 else ds
        values: Iterable[Any] = (record[cfg.text_field] for record in ds.select_columns([cfg.text_field]))
    else:
        ds = ds.select(range(min(cfg.n_documents, len(ds)))) if cfg.n_documents > 0 else ds
        values = ds[cfg.text_field]
    docs = []
    for text in values:
        if text is None:
            continue
        if not isinstance(text, str):
            raise ConfigError(f"data.text_field={cfg.text_field!r} of {source} holds {type(text).__name__} "
                              "values, not text.")
        docs.append(text)
    return docs


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: datasets wraps parse errors in a generic 'error occurred'."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    # One line, however many the library wrote (transformers lists its tokenizer loaders on five).
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"


def _hf_cache(cfg: DataConfig) -> str:
    return str(Path(cfg.cache_dir).expanduser() / "datasets")


def split_documents(docs: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, val): shuffled with ``cfg.seed``; the first ``val_documents`` are validation."""
    require(len(docs) > cfg.val_documents, "data.val_documents", cfg.val_documents,
            f"the corpus has only {len(docs)} distinct documents, so none would be left for training")
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    return [docs[i] for i in order[cfg.val_documents:]], [docs[i] for i in order[: cfg.val_documents]]


# ----------------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(cfg: DataConfig, train_docs: list[str]) -> PreTrainedTokenizerFast:
    """Our cached byte-level BPE (trained on ``train_docs`` at first use) or a pretrained HF tokenizer."""
    if cfg.tokenizer != "bpe":
        return _pretrained_tokenizer(cfg.tokenizer)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = _cache_path(cfg, "tokenizers", ".json")
    if not path.exists():
        text = _train_bpe(train_docs, cfg.vocab_size).to_str()
        _write_once(path, lambda f: f.write(text.encode()))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), eos_token=EOS, pad_token=PAD)


def _train_bpe(docs: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer, length=len(docs))
    return tokenizer


def _cache_path(cfg: DataConfig, kind: str, suffix: str) -> Path:
    """A cache file per training set: everything that changes the documents or their split is hashed."""
    key = {"name": cfg.name, "source": _source_fingerprint(cfg), "text_field": cfg.text_field,
           "n_documents": cfg.n_documents, "val_documents": cfg.val_documents, "seed": cfg.seed,
           "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    label = f"bpe{cfg.vocab_size}" if cfg.tokenizer == "bpe" else Path(cfg.tokenizer).name
    return Path(cfg.cache_dir).expanduser() / kind / f"{cfg.name}-{label}-{digest}{suffix}"


def _source_fingerprint(cfg: DataConfig) -> Any:
    if cfg.name == "synthetic":  # the grammar's source: any edit to it invalidates the caches by itself
        return hashlib.sha256(Path(stories.__file__).read_bytes()).hexdigest()
    if cfg.path is None:
        return HUB_IDS[cfg.name]
    # A Debian corpus's documents are cut by our reader: an edit to its rules invalidates the caches by itself.
    reader = hashlib.sha256(Path(debian_corpora.__file__).read_bytes()).hexdigest() if cfg.name in DEBIAN_CORPORA \
        else None
    # Every file's size and modification time (a save_to_disk folder included): an edited corpus gets
    # a new tokenizer and new tokens instead of stale ones.
    root = Path(cfg.path).expanduser().resolve()
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    return [str(root), *([reader] if reader else [])] + [
        [str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _write_once(path: Path, write: Callable[[BinaryIO], None], overwrite: bool = False) -> None:
    """Publish what ``write`` writes at ``path`` atomically, so that no reader ever sees a partial file.

    Without ``overwrite`` the first complete file wins: concurrent runs (a sweep, or one process per stage)
    must all end up with the same tokenizer, so everyone reads back the winner's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable by all
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: the last writer wins instead
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pretrained_tokenizer(name: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise ConfigError(f"data.tokenizer={name!r} could not be loaded ({_root_cause(exc)}); give a local "
                          "tokenizer directory or data.tokenizer=bpe.") from exc
    if tokenizer.eos_token is None:  # packing needs a separator between documents
        tokenizer.add_special_tokens({"eos_token": EOS})
    return tokenizer


# ----------------------------------------------------------------------------------------------- packing

def pack_documents(docs: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """One int32 tensor: every document's tokens followed by EOS, concatenated in order."""
    eos = tokenizer.eos_token_id
    pieces = []
    for start in range(0, len(docs), _TOKENIZE_CHUNK):
        ids = tokenizer(docs[start: start + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False)["input_ids"]
        flat: list[int] = []
        for doc_ids in ids:
            flat.extend(doc_ids)
            flat.append(eos)
        # int32 halves the memory of a large corpus; batches are widened to int64 when served.
        pieces.append(torch.tensor(flat, dtype=torch.int32))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


def _epoch_seed(batch_seed: int, epoch: int) -> int:
    # Mixed rather than batch_seed + epoch, so that run seed s+1 does not replay epoch 1 of run seed s.
    return (batch_seed * 1_000_003 + epoch) % (2**63)


class TokenBatches:
    """Stateful, reproducible stream of training sequences of seq_len+1 tokens, cut from the packed training documents.

    Epoch ``e`` serves every sequence once, in the order ``randperm`` gives for a generator seeded with
    ``(batch_seed, e)``; a batch that runs past the end of an epoch continues into the next.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_seed: int = 0) -> None:
        width = seq_len + 1
        n = tokens.numel() // width  # the ragged tail (< one sequence) is dropped
        if n < 1:
            raise ConfigError(f"model.seq_len={seq_len} is invalid: the training documents hold only "
                              f"{tokens.numel()} tokens, fewer than one sequence of {width}.")
        self._rows = tokens[: n * width].view(n, width)  # a view: the tokens are held once
        self.seq_len, self.n_sequences, self.batch_seed = seq_len, n, batch_seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def sha256(self) -> str:
        """Digest of the packed training tokens (their order on disk, not an epoch's shuffle)."""
        return hashlib.sha256(self._rows.contiguous().numpy()).hexdigest()  # the buffer itself: no copy

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens served per epoch: n_sequences * (seq_len + 1)."""
        return self.n_sequences * (self.seq_len + 1)

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_epoch_seed(self.batch_seed, self.epoch))
        return torch.randperm(self.n_sequences, generator=generator)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """``[batch_size, seq_len + 1]`` int64: inputs are ``x[:, :-1]``, targets ``x[:, 1:]``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        picks = []
        while batch_size > 0:
            if self.index == self.n_sequences:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(batch_size, self.n_sequences - self.index)
            picks.append(self._order[self.index: self.index + take])
            self.index += take
            batch_size -= take
        return self._rows[torch.cat(picks)].long()

    def state_dict(self) -> dict:
        """Plain ints (safe for torch.save and json); the shape fields guard against resuming another corpus."""
        return {"epoch": self.epoch, "index": self.index, "batch_seed": self.batch_seed,
                "n_sequences": self.n_sequences, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_sequences", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"cannot resume: the saved data stream has {key}={state[key]}, this corpus has "
                                 f"{getattr(self, key)} (different data config or seq_len)")
        self.batch_seed, self.epoch, self.index = int(state["batch_seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


@dataclass
class Corpus:
    """A loaded corpus: tokenizer, training stream and fixed validation sequences."""

    tokenizer: PreTrainedTokenizerFast
    vocab_size: int
    """len(tokenizer): the model's vocabulary is sized from this."""
    train: TokenBatches
    val: torch.Tensor
    """[val_sequences, seq_len + 1] int64, packed from the held-out documents only."""
    n_train_documents: int
    n_val_documents: int
    packages: dict[str, str] = field(default_factory=dict)
    """A Debian corpus: the versions of the packages its documents were read from (``provenance.corpus_packages``),
    or how they were read otherwise; empty for every other corpus."""


def load_corpus(cfg: DataConfig, seq_len: int, batch_seed: int = 0) -> Corpus:
    """Load, split, tokenize and pack a validated ``cfg`` (``validate_data_config``, run by
    ``validate_run_config``: the one gate); ``batch_seed`` (the run seed) orders the training sequences."""
    tokenizer, train_tokens, val_tokens, n_train, n_val = _packed_corpus(cfg)
    width = seq_len + 1
    require(val_tokens.numel() // width >= cfg.val_sequences, "data.val_sequences", cfg.val_sequences,
            f"the {n_val} validation documents fill only {val_tokens.numel() // width} sequences of "
            f"{width} tokens; raise data.val_documents or lower data.val_sequences")
    val = val_tokens[: cfg.val_sequences * width].view(cfg.val_sequences, width).long()
    packages = corpus_packages(cfg.name, cfg.path) if cfg.name in DEBIAN_CORPORA else {}
    return Corpus(tokenizer=tokenizer, vocab_size=len(tokenizer), train=TokenBatches(train_tokens, seq_len, batch_seed),
                  val=val, n_train_documents=n_train, n_val_documents=n_val, packages=packages)


def _packed_corpus(cfg: DataConfig) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor, int, int]:
    """(tokenizer, train tokens, val tokens, #train docs, #val docs), from the token cache when it is valid.

    Tokenizing is most of a warm load (about 2 s for the default corpus on 2 cores), and a cached hub
    corpus needs no network, so packed tokens are cached next to the tokenizer.
    """
    path = _cache_path(cfg, "tokens", ".pt")
    if path.exists() and (cfg.tokenizer != "bpe" or _cache_path(cfg, "tokenizers", ".json").exists()):
        tokenizer = load_tokenizer(cfg, train_docs=[])
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:  # unreadable (e.g. written by an incompatible torch): rebuild it below
            saved = {"tokenizer_digest": None}
        # The tokenizer's own digest guards against ids from another tokenizer (retrained, or updated upstream).
        if saved["tokenizer_digest"] == _tokenizer_digest(tokenizer):
            return tokenizer, saved["train"], saved["val"], saved["n_train"], saved["n_val"]
    train_docs, val_docs = split_documents(load_documents(cfg), cfg)
    tokenizer = load_tokenizer(cfg, train_docs)
    train, val = pack_documents(train_docs, tokenizer), pack_documents(val_docs, tokenizer)
    saved = {"tokenizer_digest": _tokenizer_digest(tokenizer), "train": train, "val": val,
             "n_train": len(train_docs), "n_val": len(val_docs)}
    # overwrite: a stale file (its tokenizer digest no longer matches) must be replaced.
    _write_once(path, lambda f: torch.save(saved, f), overwrite=True)
    return tokenizer, train, val, len(train_docs), len(val_docs)


def _tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
