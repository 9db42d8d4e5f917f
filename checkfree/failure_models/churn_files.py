"""Pool traces: when each node of a pool of machines comes up and goes down, read from our format or imported
from the public ones as published (what ``failure=churn`` replays; docs/running.md, 'Node churn from real traces').

Our format, ``failure.format=events``: CSV with the header ``time_s,node,event`` (or a JSON list of such objects),
one line per change: seconds from the trace's start, a node name, ``up`` or ``down``. Times never go back.

Imported, as published:

* ``bamboo`` -- Bamboo's AWS traces (uclasystem/bamboo, ``traces/p3-trace.csv`` and ``traces/g4dn-trace.csv``, MIT
  licensed): CSV without a header, ``time_ms,add|remove,nodeN``, absolute milliseconds from the start.
* ``skypilot`` -- SkyPilot's spot traces: JSON ``{"metadata": {"gap_seconds": G}, "data": [n_0, n_1, ...]}``, the
  number of live instances at each tick ``i`` (time ``i * G``). Counts carry no identity: a rise of ``k`` is ``k``
  new nodes (``sky<j>``, numbered in order), a fall of ``k`` takes the ``k`` most recently started ones down (a
  choice; the file cannot say which went).

Every reader refuses, in one sentence naming the file and the line or record, what cannot be replayed: wrong
columns, an unknown action, times going backwards, a node going down that is not up (never added, or already
gone), a node coming up twice, an empty trace.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from checkfree.failure_models.base import is_int, is_real
from checkfree.failure_models.trace_files import parse_json, read_text_file
from checkfree.run.config import ConfigError

FORMATS = ("events", "bamboo", "skypilot")
EVENT_FIELDS = ("time_s", "node", "event")


@dataclass(frozen=True)
class Change:
    """One node of the pool comes up (``up``) or goes down, ``time_s`` seconds after the trace's start."""

    time_s: float
    node: str
    up: bool


def read_pool_trace(path: str | Path, fmt: str = "events") -> list[Change]:
    """The pool trace at ``path`` in format ``fmt`` (``FORMATS``), checked: a ConfigError names what is wrong."""
    key = "failure.path"
    where = f"{key}={path}"
    if fmt not in FORMATS:
        raise ConfigError(f"failure.format={fmt!r} is unknown; allowed {', '.join(FORMATS)}.")
    kind, text = read_text_file(path, key)
    expected = "json" if fmt == "skypilot" else "csv" if fmt == "bamboo" else kind
    if kind != expected:
        raise ConfigError(f"{where} is a .{kind} file, but failure.format={fmt} traces are .{expected} files.")
    if fmt == "bamboo":
        rows = _bamboo(text, where)
    elif fmt == "skypilot":
        rows = _skypilot(text, where)
    else:
        rows = _events_json(text, where) if kind == "json" else _events_csv(text, where)
    return _checked(rows, where)


def _checked(rows: Iterable[tuple[str, Change]], where: str) -> list[Change]:
    """Times never go back; a node goes down only while up, and comes up only while not; at least one change."""
    live: set[str] = set()
    seen: set[str] = set()
    out, last = [], -math.inf
    for loc, change in rows:
        if change.time_s < last:
            raise ConfigError(f"{where} {loc} is at {change.time_s:g} s, before the line before it ({last:g} s); "
                              "allowed are times that never go back.")
        last = change.time_s
        if change.up:
            if change.node in live:
                raise ConfigError(f"{where} {loc} brings node {change.node!r} up, but it is up already; allowed: a "
                                  "node comes up once until it goes down.")
            live.add(change.node)
            seen.add(change.node)
        else:
            if change.node not in live:
                why = "it has gone down already" if change.node in seen else "it was never added"
                raise ConfigError(f"{where} {loc} takes node {change.node!r} down, but {why}; allowed: a node goes "
                                  "down only while it is up.")
            live.discard(change.node)
        out.append(change)
    if not out:
        raise ConfigError(f"{where} holds no change, so there is no pool to train on; allowed is a trace of at "
                          "least one node coming up.")
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _time(cell: str, where: str, loc: str, unit: str, scale: float) -> float:
    try:
        value = float(cell) * scale
    except ValueError:
        raise ConfigError(f"{where} {loc} has time {_short(cell)!r}, which is not a number of {unit}.") from None
    if not (0 <= value < math.inf):
        raise ConfigError(f"{where} {loc} has time {_short(cell)!r}; allowed finite {unit} >= 0.")
    return value


def _bamboo(text: str, where: str) -> list[tuple[str, Change]]:
    rows = []
    for i, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 3:
            raise ConfigError(f"{where} line {i} has {len(row)} field(s) ({_short(','.join(row))!r}); allowed 3: "
                              "time_ms,add|remove,nodeN (Bamboo's traces, no header).")
        t, action, node = (cell.strip() for cell in row)
        if action not in ("add", "remove"):
            raise ConfigError(f"{where} line {i} has action {_short(action)!r}; allowed add or remove.")
        rows.append((f"line {i}", Change(_time(t, where, f"line {i}", "milliseconds", 1e-3), node, action == "add")))
    return rows


def _skypilot(text: str, where: str) -> list[tuple[str, Change]]:
    raw = parse_json(text, where)
    gap = raw.get("metadata", {}).get("gap_seconds") if isinstance(raw, dict) and isinstance(
        raw.get("metadata"), dict) else None
    counts = raw.get("data") if isinstance(raw, dict) else None
    if not (is_real(gap) and 0 < gap < math.inf) or not isinstance(counts, list):
        raise ConfigError(f'{where} must be {{"metadata": {{"gap_seconds": G > 0}}, "data": [n_0, n_1, ...]}} '
                          "(SkyPilot's spot traces).")
    rows, stack, made = [], [], 0
    for i, n in enumerate(counts):
        if not (is_int(n) and n >= 0):
            raise ConfigError(f"{where} data[{i}] is {_short(repr(n))}; allowed a count of live instances >= 0.")
        while len(stack) < n:  # instances came up: new nodes, numbered in order
            stack.append(f"sky{made}")
            made += 1
            rows.append((f"data[{i}]", Change(i * float(gap), stack[-1], True)))
        while len(stack) > n:  # instances went: the latest started first (the counts cannot say which)
            rows.append((f"data[{i}]", Change(i * float(gap), stack.pop(), False)))
    return rows


def _events_csv(text: str, where: str) -> list[tuple[str, Change]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if header != list(EVENT_FIELDS):
        raise ConfigError(f"{where} line 1 has header {_short(','.join(header))!r}; allowed 'time_s,node,event'.")
    rows = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        loc = f"line {reader.line_num}"
        if len(row) != 3:
            raise ConfigError(f"{where} {loc} has {len(row)} field(s); allowed 3: time_s,node,event.")
        rows.append((loc, _event(dict(zip(EVENT_FIELDS, (c.strip() for c in row))), where, loc)))
    return rows


def _events_json(text: str, where: str) -> list[tuple[str, Change]]:
    raw = parse_json(text, where)
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConfigError(f'{where} must hold a JSON list of objects such as {{"time_s": 0, "node": "a", '
                          '"event": "up"}.')
    rows = []
    for i, record in enumerate(raw):
        if set(record) != set(EVENT_FIELDS):
            raise ConfigError(f"{where} record {i} has fields {sorted(record)}; allowed exactly {list(EVENT_FIELDS)}.")
        rows.append((f"record {i}", _event({k: str(v) for k, v in record.items()}, where, f"record {i}")))
    return rows


def _event(cells: dict[str, str], where: str, loc: str) -> Change:
    if cells["event"] not in ("up", "down"):
        raise ConfigError(f"{where} {loc} has event {_short(cells['event'])!r}; allowed up or down.")
    if not cells["node"]:
        raise ConfigError(f"{where} {loc} has no node name.")
    return Change(_time(cells["time_s"], where, loc, "seconds", 1.0), cells["node"], cells["event"] == "up")


def write_events(changes: Iterable[Change], path: str | Path) -> None:
    """Write ``changes`` in our format (CSV, ``time_s,node,event``)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(EVENT_FIELDS)
        for c in changes:
            writer.writerow([repr(c.time_s), c.node, "up" if c.up else "down"])  # exact: no moment merges


def main(argv: list[str] | None = None) -> int:
    """``python -m checkfree.failure_models.churn_files FORMAT IN OUT``: import a published trace into our format."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("format", choices=FORMATS[1:])
    parser.add_argument("source")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        changes = read_pool_trace(args.source, args.format)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_events(changes, args.out)
    print(f"{len(changes)} changes of {len({c.node for c in changes})} nodes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
