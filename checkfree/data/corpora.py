"""The corpora a run can train on, and their configuration (``DataConfig``), checked without reading them.

Torch-free on purpose: ``load_run_config`` validates a config without importing torch, transformers or
datasets. ``checkfree.data.loading`` loads, tokenizes and packs the corpus; what is defined here is imported from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from checkfree.data.debian import DEBIAN_CORPORA
from checkfree.run.config import ConfigError, require

CORPORA = ("synthetic", "tinystories", "openwebtext", "text", "json", "parquet", *DEBIAN_CORPORA)
HUB_IDS = {"tinystories": "roneneldan/TinyStories", "openwebtext": "Skylion007/openwebtext"}
FILE_SUFFIXES = {"text": (".txt",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}
SUFFIX_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")
"""A folder written by ``datasets.save_to_disk`` holds one of these."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    """Corpus: synthetic | tinystories | openwebtext | text | json | parquet | fortunes | pydocs."""
    path: str | None = None
    """Local file or directory (required for text/json/parquet and the Debian corpora fortunes/pydocs; a local
    copy for tinystories/openwebtext)."""
    text_field: str = "text"
    """Column holding the document text (json, parquet and HF datasets)."""
    tokenizer: str = "bpe"
    """"bpe" = train a byte-level BPE on the training documents (cached); else an HF tokenizer name or path."""
    vocab_size: int = 1024
    """BPE vocabulary size, special tokens included (only for tokenizer="bpe")."""
    n_documents: int = 20000
    """Synthetic corpus size; for other corpora the first n documents are taken (0 = all)."""
    val_documents: int = 500
    """Documents held out for validation; never seen in training, nor by the BPE trainer."""
    val_sequences: int = 32
    """Fixed validation sequences, packed from the held-out documents only."""
    streaming: bool | None = None
    """Stream the dataset instead of downloading it whole; None = auto (True for openwebtext only)."""
    cache_dir: str = "~/.cache/checkfree"
    """Where trained tokenizers, packed token ids and datasets' arrow caches of local files are kept."""
    seed: int = 1234
    """Corpus seed (synthetic generation, document shuffle, split); independent of the run seed."""


def validate_data_config(cfg: DataConfig) -> None:
    """Cheap checks only (no loading): raise ConfigError naming the key, the value and what is allowed."""
    require(cfg.name in CORPORA, "data.name", cfg.name, f"allowed corpora are {', '.join(CORPORA)}")
    if cfg.name in FILE_SUFFIXES:
        require(cfg.path is not None, "data.path", cfg.path, f"data.name={cfg.name} needs a local file or directory")
    if cfg.name in DEBIAN_CORPORA:
        require(cfg.path is not None, "data.path", cfg.path, _debian_hint(cfg.name))
    require(cfg.path is None or cfg.name != "synthetic", "data.path", cfg.path,
            "data.name=synthetic generates its stories and reads no file; allowed is null, or a file corpus "
            "such as data=local_text")
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if cfg.name in DEBIAN_CORPORA and not path.exists():
            raise ConfigError(f"data.path={cfg.path} does not exist: {_debian_hint(cfg.name)}.")
        require(path.exists(), "data.path", cfg.path, "no such file or directory")
        require(os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)), "data.path", cfg.path,
                "this user may not read it")
        if cfg.name in FILE_SUFFIXES:
            require(bool(data_files(cfg)), "data.path", cfg.path,
                    f"the directory holds no {'/'.join(FILE_SUFFIXES[cfg.name])} files for data.name={cfg.name}")
        elif cfg.name in DEBIAN_CORPORA:
            if not DEBIAN_CORPORA[cfg.name].files(path):
                raise ConfigError(f"data.path={cfg.path} holds no {DEBIAN_CORPORA[cfg.name].what}: "
                                  f"{_debian_hint(cfg.name)}.")
        elif path.is_dir():  # a local copy of a hub corpus: a save_to_disk folder or a snapshot of its files
            require(any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*")), "data.path",
                    cfg.path, f"the directory holds no files; allowed is a local copy of {HUB_IDS[cfg.name]} "
                    "(a save_to_disk folder, a snapshot of its files, or one data file)")
    require(bool(cfg.text_field), "data.text_field", cfg.text_field, "give the name of the text column")
    require(bool(cfg.tokenizer), "data.tokenizer", cfg.tokenizer, '"bpe" or an HF tokenizer name or path')
    if cfg.tokenizer.startswith(("/", "./", "../", "~")):  # a local path, not a hub id such as "org/name"
        require(Path(cfg.tokenizer).expanduser().is_dir(), "data.tokenizer", cfg.tokenizer,
                "no such directory; allowed is bpe, a hub tokenizer id or a local tokenizer directory")
    if cfg.tokenizer == "bpe":
        require(cfg.vocab_size >= 256, "data.vocab_size", cfg.vocab_size, "a byte-level BPE needs at least 256")
    require(cfg.val_documents >= 1, "data.val_documents", cfg.val_documents, "at least 1 held-out document")
    require(cfg.val_sequences >= 1, "data.val_sequences", cfg.val_sequences, "at least 1 validation sequence")
    require(cfg.n_documents >= 0, "data.n_documents", cfg.n_documents, "0 (= all) or a positive count")
    if cfg.name == "synthetic" or cfg.n_documents > 0:
        require(cfg.n_documents > cfg.val_documents, "data.n_documents", cfg.n_documents,
                f"it must exceed data.val_documents={cfg.val_documents} to leave training documents"
                + ("" if cfg.name == "synthetic" else " (or be 0 = all)"))


def _debian_hint(name: str) -> str:
    """What a Debian corpus reads and the apt line that installs it: most machines lack the package."""
    source = DEBIAN_CORPORA[name]
    return (f"data={name} reads the Debian package's {source.what}; install them with "
            f'"apt-get install {source.package}" (or point data.path at a copy)')


def data_files(cfg: DataConfig) -> list[Path]:
    """The files behind ``cfg.path``: the file itself, or the directory's files of the corpus's type."""
    path = Path(cfg.path or "").expanduser()
    if path.is_file():
        return [path]
    suffixes = FILE_SUFFIXES.get(cfg.name, tuple(SUFFIX_BUILDERS))
    # Sorted, so that the document order (and hence the split) does not depend on the file system.
    return sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


# --- files checked before a run -------------------------------------------------------------------------------

CHECKED_BYTES = 16 * 2**20
"""Text and JSON files up to this size in all are read and parsed by ``check_data_files`` before a run; larger
corpora are parsed (by datasets) when the run loads them, a malformed one refused then."""
PARQUET_MAGIC = (b"PAR1", b"PARE")  # plain and encrypted footers


def check_data_files(cfg: DataConfig) -> None:
    """Refuse local data files that cannot be read as ``data.name``, before a run imports datasets (seconds):
    a parquet file without parquet's magic bytes, and (up to CHECKED_BYTES) text that is not UTF-8 or JSON
    that does not parse. Only errors datasets would also raise are refused here."""
    if cfg.path is None or cfg.name in DEBIAN_CORPORA:  # their readers decode leniently: nothing to refuse here
        return
    path = Path(cfg.path).expanduser()
    files = data_files(cfg) if cfg.name in FILE_SUFFIXES else [path] if path.is_file() else []
    kinds = [(f, cfg.name if cfg.name in FILE_SUFFIXES else SUFFIX_BUILDERS.get(f.suffix, "text")) for f in files]
    for file, kind in kinds:
        if kind == "parquet":
            _check_parquet(file)
    texts = [(f, kind) for f, kind in kinds if kind != "parquet"]
    if sum(_size(f) for f, _ in texts) > CHECKED_BYTES:
        return
    for file, kind in texts:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"data.path={file} could not be read ({exc.strerror or exc}).") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"data.path={file} could not be read as {kind} (byte {exc.start} is not UTF-8); "
                              "allowed is UTF-8 text.") from None
        if kind == "json":
            bad = _bad_json(text)
            if bad is not None:
                raise ConfigError(f"data.path={file}:{bad[0]} could not be read as json ({bad[1]}).")


def find_bad_json(files: list[Path]) -> str | None:
    """``file`` or ``file:line`` of the first malformed JSON file: datasets' errors do not name it."""
    for path in files:
        bad = _bad_json(path.read_text(encoding="utf-8", errors="replace"))
        if bad is not None:
            return f"{path}:{bad[0]}"
    return str(files[0]) if len(files) == 1 else None


def _bad_json(text: str) -> tuple[int, str] | None:
    """(line, what is wrong) of the first JSON error, or None: ``text`` is one JSON document (a list of records,
    or an object) or JSON Lines (one record a line), as datasets' json builder reads them."""
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                return exc.lineno, f"{exc.msg}: column {exc.colno}"
    for lineno, line in enumerate(text.splitlines(), 1):  # JSON Lines
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as exc:
            return lineno, f"{exc.msg}: column {exc.colno}"
    return None


def _check_parquet(file: Path) -> None:
    try:
        with file.open("rb") as f:
            head = f.read(4)
            f.seek(max(0, _size(file) - 4))
            tail = f.read(4)
    except OSError as exc:
        raise ConfigError(f"data.path={file} could not be read ({exc.strerror or exc}).") from None
    if _size(file) < 8 or head not in PARQUET_MAGIC or tail not in PARQUET_MAGIC:
        raise ConfigError(f"data.path={file} could not be read as parquet (it does not start and end with "
                          "parquet's magic bytes PAR1); allowed is a parquet file.")


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


NOT_INSTALLED = "not installed"


def installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Each package's installed version as dpkg knows it; "not installed", or "unknown" without dpkg."""
    import shutil
    import subprocess

    if shutil.which("dpkg-query") is None:
        return dict.fromkeys(packages, "unknown")
    versions = {}
    for name in packages:
        done = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", name],
                              capture_output=True, text=True, check=False)
        status, _, version = done.stdout.partition(" ")
        versions[name] = version if done.returncode == 0 and status == "installed" and version else NOT_INSTALLED
    return versions


def corpus_packages(name: str, path: str | None) -> dict[str, str]:
    """The environment record's entries of a Debian corpus read from ``path``: its packages' versions, when the
    path is where they install their files; a copy elsewhere is recorded as such (its version cannot be
    known)."""
    source = DEBIAN_CORPORA[name]
    if path is None or Path(path).expanduser().resolve() != Path(source.default_path).resolve():
        return dict.fromkeys(source.packages, f"unknown (a copy at {path})")
    return installed_versions(source.packages)
