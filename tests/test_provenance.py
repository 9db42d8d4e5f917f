"""checkfree.run.provenance: a summary says which libraries and which tokens made its numbers."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import metadata

import torch

from checkfree.data.loading import TokenBatches
from checkfree.run.provenance import PACKAGES, describe, environment, machine, tokens_sha256, versions


def test_the_training_digest_is_sha256_of_the_packed_rows_and_changes_with_one_token():
    tokens = torch.arange(23, dtype=torch.int64)  # seq_len 4: rows of 5, the ragged tail of 3 is dropped
    batches = TokenBatches(tokens, seq_len=4)
    assert batches.sha256() == hashlib.sha256(tokens[:20].numpy().tobytes()).hexdigest()
    batches.next_batch(3)  # serving batches moves the epoch's order, not the digest
    assert batches.sha256() == hashlib.sha256(tokens[:20].numpy().tobytes()).hexdigest()
    changed = tokens.clone()
    changed[7] = 99
    assert TokenBatches(changed, seq_len=4).sha256() != batches.sha256()
    assert TokenBatches(tokens, seq_len=4, batch_seed=5).sha256() == batches.sha256()  # the order is the seed's


def test_the_record_joins_train_and_validation_and_names_each_library_version():
    val = torch.tensor([[1, 2, 3], [4, 5, 6]])
    joined = tokens_sha256("ab", val)
    assert joined == hashlib.sha256(b"ab" + val.numpy().tobytes()).hexdigest()
    assert tokens_sha256("ab", val + 1) != joined and tokens_sha256("ac", val) != joined
    assert versions() == {"python": versions()["python"], **{p: metadata.version(p) for p in PACKAGES}}
    assert set(PACKAGES) >= {"torch", "transformers", "tokenizers"}


def test_a_run_summary_carries_the_environment_of_its_corpus(small_run, tmp_path):
    from checkfree.train import build_run

    run = build_run(small_run(trainer={"iterations": 1, "eval_every": 1}), tmp_path / "run")
    summary = run.run()
    corpus = run.trainer.corpus
    assert summary["environment"] == {**versions(), "machine": machine(),
                                      "tokens_sha256": tokens_sha256(corpus.train.sha256(), corpus.val)}
    # the processor's model and the cores this process may use, as /proc/cpuinfo and the affinity mask say
    assert machine().endswith(f", {len(os.sched_getaffinity(0))} cores")
    assert environment(corpus) == summary["environment"]


def test_a_report_names_the_one_environment_or_warns_with_each_and_its_count():
    a = {"python": "3.11.7", "torch": "2.13.0+cpu", "tokens_sha256": "76f6a63991f93c16"}
    b = {**a, "tokens_sha256": "0123456789abcdef"}
    assert describe([a, dict(a)]) == "Environment of all 2 runs: python 3.11.7, torch 2.13.0+cpu; tokens sha256 76f6a63991f9."
    assert describe([a], [a, a]) == ("Environment of all 1 runs and 2 calibration runs: python 3.11.7, torch "
                                     "2.13.0+cpu; tokens sha256 76f6a63991f9.")
    assert describe([a, b, a], [None]) == (
        "Warning: these 3 runs and 1 calibration runs were made in 3 environments, so their numbers do not compare "
        "to the digit: 2 with python 3.11.7, torch 2.13.0+cpu; tokens sha256 76f6a63991f9; "
        "1 with python 3.11.7, torch 2.13.0+cpu; tokens sha256 0123456789ab; "
        "1 with not recorded (made before summaries carried their environment).")


def test_a_package_without_metadata_is_unknown_not_an_error(monkeypatch):
    real = metadata.version

    def version(name):
        if name == "tokenizers":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    assert versions()["tokenizers"] == "unknown" and versions()["torch"] == real("torch")


def test_a_debian_corpus_records_its_package_versions_and_names_another_one():
    """The committed pydocs results were made with python3.11-doc 3.11.2-6+deb12u8; its security update gives
    other tokens, and a run on it says so, naming both and the apt line that installs the committed one."""
    from checkfree.data.corpora import NOT_INSTALLED, corpus_packages, installed_versions
    from checkfree.run.provenance import version_warning

    if shutil.which("dpkg-query"):
        dpkg = installed_versions(("dpkg", "checkfree-no-such-package"))
        assert dpkg["dpkg"] == metadata_free_dpkg_version() and dpkg["checkfree-no-such-package"] == NOT_INSTALLED
    else:
        assert installed_versions(("dpkg",)) == {"dpkg": "unknown"}
    assert corpus_packages("pydocs", "/usr/share/doc/python3.11/html/_sources") == installed_versions(("python3.11-doc",))
    assert corpus_packages("pydocs", "/tmp/docs") == {"python3.11-doc": "unknown (a copy at /tmp/docs)"}
    assert version_warning("pydocs", {"python3.11-doc": "3.11.2-6+deb12u8"}) is None
    assert version_warning("pydocs", {"python3.11-doc": "3.11.2-6+deb12u9"}) == (
        "data=pydocs: python3.11-doc 3.11.2-6+deb12u9 here, but the committed results were made with python3.11-doc "
        "3.11.2-6+deb12u8; its tokens differ, so numbers will not regenerate to the digit (apt-get install "
        "python3.11-doc=3.11.2-6+deb12u8).")
    assert version_warning("fortunes", {"fortunes": "1:1.99.1-7.3"}) is None  # no version recorded for it
    assert version_warning("synthetic", {}) is None


def metadata_free_dpkg_version() -> str:
    """dpkg's own version, as dpkg --version prints it (its first line ends with it, before the architecture)."""
    first = subprocess.run(["dpkg", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return first.split(" version ")[1].split()[0]
