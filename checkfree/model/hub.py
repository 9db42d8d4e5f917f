"""Whether a pretrained tokenizer named by a hub id can be had, decided in a second, before a run starts.

``AutoTokenizer.from_pretrained("gpt2")`` on a machine without the hub retries for about a minute (five
retries with back-off, each printing a warning) before it fails. So the preflight asks first: is the
tokenizer in the local Hugging Face cache? If not, may the hub be asked (``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE``), and does its host answer a TCP connect within ``REACH_TIMEOUT_S``? A name the
hub does not know is then refused by the hub itself at once (a 404 is not retried).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from checkfree.run.config import ConfigError

REACH_TIMEOUT_S = 3.0
"""How long a TCP connect to the hub may take before it counts as unreachable."""
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
"""A cached tokenizer has at least one of these."""


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached(repo_id: str) -> bool:
    """True if the local Hugging Face cache holds a tokenizer file of ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in TOKENIZER_FILES)
    except Exception:  # an id the hub's validator refuses ("a//b"): not in any cache
        return False


def unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached (None: a TCP connect to it succeeded)."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def check_tokenizer(name: str) -> None:
    """Refuse ``data.tokenizer=<hub id>`` at once when it cannot be loaded on this machine."""
    if name == "bpe" or name.startswith(("/", "./", "../", "~")) or os.path.isdir(name) or cached(name):
        return
    if offline():
        raise ConfigError(f"data.tokenizer={name!r} is invalid: it is not in the local Hugging Face cache and "
                          "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids downloading it; allowed here: bpe, a "
                          "local tokenizer directory, or a tokenizer already in the cache.")
    from huggingface_hub import constants

    why = unreachable(constants.ENDPOINT)
    if why is not None:
        raise ConfigError(f"data.tokenizer={name!r} is invalid: it is not in the local Hugging Face cache and "
                          f"the hub ({constants.ENDPOINT}) cannot be reached ({why}); allowed here: bpe, a local "
                          "tokenizer directory, or a tokenizer already in the cache.")
