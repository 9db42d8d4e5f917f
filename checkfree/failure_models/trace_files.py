"""Trace files: a JSON or CSV list of failure events, read into ``FailureEvent`` s or refused with a ConfigError
that names the record (what ``failure=trace`` replays).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from checkfree.failure_models.base import FailureEvent, is_int, is_real
from checkfree.run.config import ConfigError

TRACE_FIELDS = ("stage", "iteration", "time_s", "replica")


def read_trace(path: str | Path) -> list[FailureEvent]:
    """Read a trace file into events, in file order; a malformed file raises a ConfigError naming the record.

    JSON: a list of objects, ``[{"iteration": 5, "stage": 2}, {"time_s": 30.5, "stage": 1}]``; records are
    numbered from 0 as in the list. CSV: a header ``stage,iteration`` / ``stage,time_s`` / both, then one
    event per line (empty cells allowed); lines are numbered from 1, the header being line 1. Each event
    has a stage >= 0 and exactly one of an iteration >= 1 or a time_s >= 0, and optionally a ``replica`` >= 0:
    then only that replica's node is lost (``engine.replicas`` > 1), not the whole stage.
    """
    return [event for _, event in read_trace_records(path)]


def read_trace_records(path: str | Path) -> list[tuple[str, FailureEvent]]:
    """(location in the file, event) pairs, so later checks can point at the offending record."""
    where = f"failure.path={path}"
    kind, text = read_text_file(path, "failure.path")
    return _read_json(text, where) if kind == "json" else _read_csv(text, where)


def read_text_file(path: str | Path, key: str) -> tuple[str, str]:
    """('json' | 'csv', the text) of the JSON or CSV file that config key ``key`` names, or a ConfigError that
    says why it is not one (missing, a directory or device, another extension, binary, not UTF-8)."""
    path = Path(path)
    where = f"{key}={path}"
    if path.is_dir():
        raise ConfigError(f"{where} is invalid: it is a directory; point {key} at a JSON or CSV trace file.")
    if not path.exists():
        raise ConfigError(f"{where} is invalid: no such file; point {key} at a JSON or CSV trace.")
    if not path.is_file():  # a device or a FIFO: reading it would never end
        raise ConfigError(f"{where} is invalid: it is not a regular file; point {key} at a JSON or CSV "
                          "trace file.")
    if path.suffix.lower() == ".json":
        return "json", _read_text(path, where, "utf-8")
    if path.suffix.lower() == ".csv":
        return "csv", _read_text(path, where, "utf-8-sig")  # -sig: spreadsheets often prepend a BOM
    raise ConfigError(f"{where} is invalid: unknown extension {path.suffix!r}, allowed .json or .csv.")


def parse_json(text: str, where: str) -> Any:
    """The JSON value of a trace file's ``text``, or a ConfigError naming where it stops being JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None


def _read_text(path: Path, where: str, encoding: str) -> str:
    """The file as text, or a ConfigError saying why it is not a text trace (unreadable, binary, not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} is invalid: it cannot be read ({e.strerror or e}).") from None
    nul = data.find(b"\0")
    if nul >= 0:  # UTF-8 text never holds a NUL byte; a binary file (or UTF-16 text) does
        raise ConfigError(f"{where} is invalid: it is a binary file (byte {nul} is NUL); allowed is a JSON or CSV "
                          "text file of events.")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is invalid: it is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                          "allowed is a JSON or CSV file of events in UTF-8.") from None


def _read_json(text: str, where: str) -> list[tuple[str, FailureEvent]]:
    records = parse_json(text, where)
    if not isinstance(records, list):
        raise ConfigError(f'{where} must hold a JSON list of events such as [{{"iteration": 5, "stage": 2}}], '
                          f"not a {type(records).__name__}.")
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(f"{where} record {i} is {_short(record)}, not an object with 'stage' and 'iteration' "
                              "or 'time_s'.")
        out.append((f"record {i}", _event(record, where, f"record {i}")))
    return out


def _read_csv(text: str, where: str) -> list[tuple[str, FailureEvent]]:
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        if ("stage" not in header or not {"iteration", "time_s"} & set(header)
                or not set(header) <= set(TRACE_FIELDS) or len(set(header)) != len(header)):
            raise ConfigError(f"{where} line 1 has header {_short(','.join(header))}; allowed 'stage' plus "
                              "'iteration' and/or 'time_s', e.g. 'stage,iteration'.")
        for row in reader:
            loc = f"line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ConfigError(f"{where} {loc} has {len(row)} fields but the header has {len(header)}.")
            record: dict[str, Any] = {}
            for key, cell in zip(header, (c.strip() for c in row)):
                if not cell:
                    continue  # an empty cell is an absent field
                try:
                    record[key] = float(cell) if key == "time_s" else int(cell)
                except ValueError:
                    kind = "a number" if key == "time_s" else "an integer"
                    raise ConfigError(f"{where} {loc} has {key}={_short(cell)}, which is not {kind}.") from None
            out.append((loc, _event(record, where, loc)))
    except csv.Error as e:  # e.g. a field over the csv module's size limit
        raise ConfigError(f"{where} line {reader.line_num} is not valid CSV ({e}).") from None
    return out


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes a record, never a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _event(record: dict[str, Any], where: str, loc: str) -> FailureEvent:
    unknown = sorted(set(record) - set(TRACE_FIELDS))
    if unknown:
        raise ConfigError(f"{where} {loc} has unknown field(s) {_short(unknown)}; allowed {list(TRACE_FIELDS)}.")
    stage, iteration, time_s = record.get("stage"), record.get("iteration"), record.get("time_s")
    replica = record.get("replica")
    if replica is not None and not (is_int(replica) and replica >= 0):
        raise ConfigError(f"{where} {loc} has replica={_short(replica)}; allowed a replica index >= 0 (or no "
                          "replica: the whole stage).")
    if stage is None:
        raise ConfigError(f"{where} {loc} has no 'stage'; each event needs a stage and an iteration or time_s.")
    if not is_int(stage) or stage < 0:
        raise ConfigError(f"{where} {loc} has stage={_short(stage)}; allowed a stage index >= 0.")
    if iteration is not None and time_s is not None:
        raise ConfigError(f"{where} {loc} has both 'iteration' and 'time_s'; allowed exactly one of them.")
    if iteration is None and time_s is None:
        raise ConfigError(f"{where} {loc} has neither 'iteration' nor 'time_s'; allowed exactly one of them.")
    if iteration is not None and not (is_int(iteration) and iteration >= 1):
        raise ConfigError(f"{where} {loc} has iteration={_short(iteration)}; allowed an integer >= 1 (1-based).")
    if time_s is not None and not (is_real(time_s) and 0 <= time_s < math.inf):
        raise ConfigError(f"{where} {loc} has time_s={_short(time_s)}; allowed finite simulated seconds >= 0.")
    return FailureEvent(int(stage), None if iteration is None else int(iteration),
                        None if time_s is None else float(time_s), None if replica is None else int(replica))


DELAY_FIELDS = ("stage", "delay_h")


def read_delays(path: str | Path, n_stages: int) -> dict[int, list[float]]:
    """``failure.replacement=trace``: node slot -> the delays, in simulated hours, of its successive
    replacements (the ``j``-th record of a slot is its ``j``-th loss's; ``inf``: that one never comes).

    JSON: ``[{"stage": 2, "delay_h": 1.5}, {"stage": 2, "delay_h": null}]`` (null: never); CSV: a header
    ``stage,delay_h``, then one record per line (an empty delay: never). A malformed record is refused with a
    ConfigError naming it."""
    key = "failure.replacement_path"
    where = f"{key}={path}"
    kind, text = read_text_file(path, key)
    records: list[tuple[str, dict[str, Any]]] = []
    if kind == "json":
        raw = parse_json(text, where)
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise ConfigError(f'{where} must hold a JSON list of objects such as [{{"stage": 2, "delay_h": 1.5}}].')
        records = [(f"record {i}", r) for i, r in enumerate(raw)]
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [h.strip() for h in next(reader, [])]
        if sorted(header) != sorted(DELAY_FIELDS):
            raise ConfigError(f"{where} line 1 has header {_short(','.join(header))}; allowed 'stage,delay_h'.")
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) != len(header):  # a short row would read as "never replaced", a long one lose cells
                    raise ConfigError(f"{where} line {reader.line_num} has {len(row)} cell(s) "
                                      f"({_short(','.join(row))}); allowed 2: stage,delay_h (an empty delay_h cell "
                                      "for a replacement that never comes).")
                cells = dict(zip(header, (c.strip() for c in row)))
                records.append((f"line {reader.line_num}", {
                    "stage": int(cells["stage"]) if cells.get("stage", "").lstrip("-").isdigit()
                    else cells.get("stage"),
                    "delay_h": _number(cells.get("delay_h", ""))}))
    if not records:  # as an empty failure trace is: it would mean "replaced at once", which is not a trace
        raise ConfigError(f"{where} holds no record; allowed: at least one {{stage, delay_h}} record, or "
                          "failure.replacement=immediate.")
    delays: dict[int, list[float]] = {}
    for loc, record in records:
        stage, delay = record.get("stage"), record.get("delay_h", "missing")
        if set(record) - set(DELAY_FIELDS) or not is_int(stage) or not 0 <= stage < n_stages:
            raise ConfigError(f"{where} {loc} is {_short(record)}; allowed {{stage: 0..{n_stages - 1}, delay_h: "
                              "hours >= 0 or null for never}.")
        if delay is not None and not (is_real(delay) and 0 <= delay < math.inf):
            raise ConfigError(f"{where} {loc} has delay_h={_short(delay)}; allowed simulated hours >= 0, or null "
                              "(an empty cell) for a replacement that never comes.")
        delays.setdefault(int(stage), []).append(math.inf if delay is None else float(delay))
    return delays


def _number(cell: str) -> float | str | None:
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return cell
