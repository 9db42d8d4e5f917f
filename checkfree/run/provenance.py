"""What a run's numbers depend on beyond its config: the libraries' versions, the Debian packages a corpus was
read from, and the exact tokens it saw.

One config gives the same numbers to the digit only in the same environment: a newer ``tokenizers`` may train
another BPE on the same documents, a newer ``transformers`` may initialise Llama blocks differently. (Both are
unpinned ranges in pyproject.toml; ``constraints.txt`` pins the versions Table 2 and the crossover were regenerated with.) Every
summary carries this record, so a report that puts runs side by side can tell when they were not made alike.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections import Counter
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from checkfree.data.loading import Corpus

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "numpy")
"""The libraries whose version changes a run's numbers (its model, its tokens or their order)."""


def versions() -> dict[str, str]:
    """Python's and each of PACKAGES' installed version."""
    return {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # a build without its distribution's metadata (some source builds)
        return "unknown"


def version_warning(name: str, versions: dict[str, str]) -> str | None:
    """One sentence when a Debian corpus was read from other package versions than its committed results were
    made with: both named, and how to install the committed one. None when they agree (or none is recorded)."""
    from checkfree.data.debian import DEBIAN_CORPORA

    made_with = DEBIAN_CORPORA[name].made_with if name in DEBIAN_CORPORA else {}
    other = {p: v for p, v in versions.items() if p in made_with and v != made_with[p]}
    if not other:
        return None
    return ("data={}: {} here, but the committed results were made with {}; its tokens differ, so numbers will "
            "not regenerate to the digit (apt-get install {}).").format(
        name, ", ".join(f"{p} {v}" for p, v in other.items()),
        ", ".join(f"{p} {made_with[p]}" for p in other), " ".join(f"{p}={made_with[p]}" for p in other))


def tokens_sha256(train_sha256: str, val: torch.Tensor) -> str:
    """One digest of the training tokens' digest and the validation tokens: equal digests, equal data."""
    digest = hashlib.sha256(train_sha256.encode())
    digest.update(val.contiguous().numpy())  # the buffer itself: no copy of the tokens
    return digest.hexdigest()


def machine() -> str:
    """The processor model and the number of cores this process may use: CPU kernels round differently from one
    processor to another, and a run's seconds are its machine's (a report that ranks strategies by measured time
    ranks runs of one machine only: ``experiments/clock_check.py``)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:  # not Linux: the platform's own name
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def environment(corpus: Corpus) -> dict[str, str]:
    """The record a summary carries: versions (of the libraries, and of the Debian packages a corpus was read
    from), the machine, and the digest of the corpus's tokens (train and validation)."""
    return {**versions(), **corpus.packages, "machine": machine(),
            "tokens_sha256": tokens_sha256(corpus.train.sha256(), corpus.val)}


def label(env: dict[str, str] | None) -> str:
    """One line for one environment record (None: a run made before summaries carried one)."""
    if not env:
        return "not recorded (made before summaries carried their environment)"
    libraries = ", ".join(f"{name} {version}" for name, version in env.items() if name != "tokens_sha256")
    return f"{libraries}; tokens sha256 {env.get('tokens_sha256', '?')[:12]}"


def describe(envs: list[dict[str, str] | None], calibration: list[dict[str, str] | None] = ()) -> str:
    """A report's sentence on the environments of its runs (and of the calibration runs that fixed its T): the
    one they share, or a warning that lists each with its number of runs (their numbers then do not compare to
    the digit)."""
    counts = Counter(label(env) for env in [*envs, *calibration])
    what = f"{len(envs)} runs" + (f" and {len(calibration)} calibration runs" if calibration else "")
    if len(counts) == 1:
        return f"Environment of all {what}: {next(iter(counts))}."
    return (f"Warning: these {what} were made in {len(counts)} environments, so their numbers do not compare to "
            "the digit: " + "; ".join(f"{n} with {text}" for text, n in counts.most_common()) + ".")
