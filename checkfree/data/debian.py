"""Two real-text corpora that Debian packages install: fortune cookies and the Python documentation's sources.

``data=fortunes`` reads the cookie files of the ``fortunes`` package (and its dependency ``fortunes-min``) in
``/usr/share/games/fortunes``, one document per cookie. ``data=pydocs`` reads the reStructuredText sources that
``python3.11-doc`` installs in ``/usr/share/doc/python3.11/html/_sources``, one document per section.

Both are small, offline and real, so a CPU run can train on text that is not generated. Torch-free: the file
listings are used by ``checkfree.data.corpora`` to validate a config before anything heavy is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------------------------------------ fortunes

COOKIE_SEPARATOR = b"%"
"""A line holding exactly this ends a cookie (the strfile(1) convention the ``.dat`` indexes are built from)."""
NOT_COOKIES = (".dat", ".u8")
"""``.dat`` is strfile's binary index; ``.u8`` is a link to (or a UTF-8 copy of) the cookie file beside it."""


def cookie_files(root: Path) -> list[Path]:
    """The cookie files directly in ``root`` (or ``root`` itself when it is a file), sorted by name.

    Subfolders are left out on purpose: Debian puts the offensive cookies (fortunes-off) in ``off/`` and
    other languages (fortunes-de, fortunes-fr, ...) in ``de/``, ``fr/``, ...; this corpus is the English
    collection of fortunes and fortunes-min only.
    """
    if root.is_file():
        return [root]
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix not in NOT_COOKIES)


def read_fortunes(root: Path) -> list[str]:
    """Every cookie of every cookie file under ``root``, in file order then cookie order (stripped, non-empty)."""
    return [cookie for path in cookie_files(root) for cookie in split_cookies(path.read_bytes())]


def split_cookies(data: bytes) -> list[str]:
    """A cookie file's cookies: the text between lines consisting of exactly ``%``."""
    cookies, lines = [], []
    for line in data.splitlines():
        if line == COOKIE_SEPARATOR:
            cookies.append(_decode_cookie(b"\n".join(lines)))
            lines = []
        else:
            lines.append(line)
    cookies.append(_decode_cookie(b"\n".join(lines)))  # the last cookie may lack a closing %
    return [c.strip() for c in cookies if c.strip()]


def _decode_cookie(data: bytes) -> str:
    """UTF-8, else Latin-1, per cookie: old BSD cookie files predate UTF-8 and were Latin-1, and Latin-1 maps
    every byte to a character, so a legacy cookie keeps its accents instead of turning into U+FFFD, while one
    bad cookie leaves the UTF-8 cookies beside it untouched."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# ------------------------------------------------------------------------------------------------ pydocs

RST_SUFFIX = ".rst.txt"
"""Sphinx copies each page's source to ``_sources/<page>.rst.txt``."""
MIN_SECTION_CHARS = 200
"""A section shorter than this (a title with only a label or a one-line intro before its first subsection) is
merged into the section that follows, so that no text is lost and no document is a bare heading."""
_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1*")
"""A section adornment: one printable non-alphanumeric ASCII character, repeated (docutils' rule)."""
_LABEL = re.compile(r"\.\. _[^:]+:")
"""An internal hyperlink target on a line of its own, as Sphinx puts above the title it names."""


def rst_files(root: Path) -> list[Path]:
    """The ``*.rst.txt`` files under ``root`` (or ``root`` itself when it is a file), sorted by path."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob(f"*{RST_SUFFIX}")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_pydocs(root: Path) -> list[str]:
    """Every section of every ``.rst.txt`` file under ``root``, in path order then section order."""
    # Sphinx requires UTF-8 sources; a stray bad byte costs one U+FFFD rather than the whole corpus.
    return [doc for path in rst_files(root)
            for doc in split_sections(path.read_text(encoding="utf-8", errors="replace"))]


def split_sections(text: str, min_chars: int = MIN_SECTION_CHARS) -> list[str]:
    """A reStructuredText page cut at its section titles: each document is a title with its adornment and the
    body up to the next title, verbatim; text before the first title goes with the first section, and
    sections shorter than ``min_chars`` are merged into the next one (the last into the one before)."""
    lines = text.splitlines()
    starts = [_with_labels(lines, s) for s in section_starts(lines)]
    bounds = [0, *starts[1:], len(lines)]
    sections = [s for s in ("\n".join(lines[a:b]).strip() for a, b in zip(bounds, bounds[1:])) if s]
    return _merge_short(sections, min_chars)


def section_starts(lines: list[str]) -> list[int]:
    """Indices of the lines that start a section: the title line, or its overline when it has one.

    A title is a non-blank, unindented line that follows a blank line (or the start, or the previous title's
    underline) and is followed by an adornment line at least as long as itself. With an overline, the title
    may be indented and overline and underline must use the same character. Indented text (literal and code
    blocks, block quotes, directive bodies) therefore never holds a title, and neither does a dashed line
    under a longer line of a table or a paragraph.
    """
    starts: list[int] = []
    i, after_title = 0, False
    while i < len(lines):
        follows_break = i == 0 or after_title or not lines[i - 1].strip()
        after_title = False
        if follows_break and _is_overlined_title(lines, i):
            starts.append(i)
            i, after_title = i + 3, True
        elif follows_break and _is_underlined_title(lines, i):
            starts.append(i)
            i, after_title = i + 2, True
        else:
            i += 1
    return starts


def _with_labels(lines: list[str], start: int) -> int:
    """``start`` moved back over the link targets (``.. _name:``) just above it: they label this section, so
    they belong to its document rather than at the end of the one before."""
    i = start
    while i > 0 and (_LABEL.fullmatch(lines[i - 1].rstrip()) or not lines[i - 1].strip()):
        i -= 1
    while i < start and not lines[i].strip():  # the blank lines before the first label stay behind
        i += 1
    return i


def _is_underlined_title(lines: list[str], i: int) -> bool:
    title = lines[i].rstrip()
    return (i + 1 < len(lines) and bool(title) and not title[0].isspace() and not _is_adornment(title)
            and _is_adornment(lines[i + 1]) and len(lines[i + 1].rstrip()) >= len(title))


def _is_overlined_title(lines: list[str], i: int) -> bool:
    if i + 2 >= len(lines) or not _is_adornment(lines[i]) or not _is_adornment(lines[i + 2]):
        return False
    over, title, under = lines[i].rstrip(), lines[i + 1].strip(), lines[i + 2].rstrip()
    return (bool(title) and not _is_adornment(title) and over[0] == under[0]
            and min(len(over), len(under)) >= len(title))


def _is_adornment(line: str) -> bool:
    return _ADORNMENT.fullmatch(line.rstrip()) is not None


def _merge_short(sections: list[str], min_chars: int) -> list[str]:
    docs: list[str] = []
    pending = ""
    for section in sections:
        section = f"{pending}\n\n{section}" if pending else section
        if len(section) < min_chars:
            pending = section
        else:
            docs.append(section)
            pending = ""
    if pending:  # a short last section: it ends the section before it (or is the page's only document)
        if docs:
            docs[-1] = f"{docs[-1]}\n\n{pending}"
        else:
            docs.append(pending)
    return docs


# ------------------------------------------------------------------------------------------------ the registry

@dataclass(frozen=True)
class DebianCorpus:
    """Where a corpus comes from and how its files become documents."""

    package: str
    """The Debian package that installs the files (named in the install hint)."""
    packages: tuple[str, ...]
    """Every package whose files the corpus reads (``package`` and its dependencies that ship documents): their
    versions go into every summary's environment record (``checkfree.run.provenance``)."""
    made_with: dict[str, str]
    """The versions the committed results were made with (empty: not recorded when they were made); another
    installed version is named in a warning (``version_warning``), as its tokens differ."""
    default_path: str
    """Where the package installs them (the YAML's data.path)."""
    what: str
    """The files, in words, for error messages."""
    files: Callable[[Path], list[Path]]
    read: Callable[[Path], list[str]]


DEBIAN_CORPORA = {
    "fortunes": DebianCorpus(package="fortunes", packages=("fortunes", "fortunes-min"), made_with={},
                             default_path="/usr/share/games/fortunes",
                             what="cookie files", files=cookie_files, read=read_fortunes),
    # Debian 12's point release (deb12u8) and its security update (deb12u9) ship the same files but for a few
    # pages' text: the same counts of sections and tokens, other tokens (sha256 06d215304b1d... against
    # a904ba57edda...), validation curves up to +-0.03 apart.
    "pydocs": DebianCorpus(package="python3.11-doc", packages=("python3.11-doc",),
                           made_with={"python3.11-doc": "3.11.2-6+deb12u8"},
                           default_path="/usr/share/doc/python3.11/html/_sources",
                           what="reStructuredText sources (*.rst.txt)", files=rst_files, read=read_pydocs),
}

