"""The corpora a run can train on, and their configuration (``DataConfig``), checked without reading them.

Torch-free on purpose: ``load_run_config`` validates a config without importing torch, transformers or
datasets. ``checkfree.data`` loads, tokenizes and packs the corpus, and re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from checkfree.config import require

CORPORA = ("synthetic", "tinystories", "openwebtext", "text", "json", "parquet")
HUB_IDS = {"tinystories": "roneneldan/TinyStories", "openwebtext": "Skylion007/openwebtext"}
FILE_SUFFIXES = {"text": (".txt",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}
SUFFIX_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    """Corpus: synthetic | tinystories | openwebtext | text | json | parquet."""
    path: str | None = None
    """Local file or directory (required for text/json/parquet; a local copy for tinystories/openwebtext)."""
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
    if cfg.path is not None:
        require(Path(cfg.path).expanduser().exists(), "data.path", cfg.path, "no such file or directory")
        if cfg.name in FILE_SUFFIXES:
            require(bool(data_files(cfg)), "data.path", cfg.path,
                    f"the directory holds no {'/'.join(FILE_SUFFIXES[cfg.name])} files for data.name={cfg.name}")
    require(bool(cfg.text_field), "data.text_field", cfg.text_field, "give the name of the text column")
    require(bool(cfg.tokenizer), "data.tokenizer", cfg.tokenizer, '"bpe" or an HF tokenizer name or path')
    if cfg.tokenizer == "bpe":
        require(cfg.vocab_size >= 256, "data.vocab_size", cfg.vocab_size, "a byte-level BPE needs at least 256")
    require(cfg.val_documents >= 1, "data.val_documents", cfg.val_documents, "at least 1 held-out document")
    require(cfg.val_sequences >= 1, "data.val_sequences", cfg.val_sequences, "at least 1 validation sequence")
    require(cfg.n_documents >= 0, "data.n_documents", cfg.n_documents, "0 (= all) or a positive count")
    if cfg.name == "synthetic" or cfg.n_documents > 0:
        require(cfg.n_documents > cfg.val_documents, "data.n_documents", cfg.n_documents,
                f"it must exceed data.val_documents={cfg.val_documents} to leave training documents"
                + ("" if cfg.name == "synthetic" else " (or be 0 = all)"))


def data_files(cfg: DataConfig) -> list[Path]:
    """The files behind ``cfg.path``: the file itself, or the directory's files of the corpus's type."""
    path = Path(cfg.path or "").expanduser()
    if path.is_file():
        return [path]
    suffixes = FILE_SUFFIXES.get(cfg.name, tuple(SUFFIX_BUILDERS))
    # Sorted, so that the document order (and hence the split) does not depend on the file system.
    return sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))
