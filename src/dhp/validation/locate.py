"""Line and column of an issue's ``expression`` in the source JSON.

The expression (``Patient.identifier[0].system``, ``Observation.value.ofType(Quantity)``) is turned back
into a JSON path over the parsed resource, and a small position-tracking scanner finds where that path
starts in the source bytes. Positions are added as the standard OperationOutcome issue extensions
``operationoutcome-issue-line`` / ``-col`` (1-based), and as "line L, column C" in ``details.text``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from dhp.errors import Issue

LINE_EXT = "http://hl7.org/fhir/StructureDefinition/operationoutcome-issue-line"
COL_EXT = "http://hl7.org/fhir/StructureDefinition/operationoutcome-issue-col"

_SEG_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\.ofType\(([A-Za-z]+)\))?((?:\[\d+\])*)")


def json_path(resource: Any, expression: str) -> list[str | int]:
    """Map a FHIRPath-style issue expression to keys/indexes in the parsed resource (as far as it goes)."""
    parts = re.split(r"\.(?![^(]*\))", expression)
    out: list[str | int] = []
    cur = resource
    prev: Any = None
    start = 1 if parts and isinstance(resource, dict) and parts[0] == resource.get("resourceType") else 0
    for part in parts[start:]:
        m = re.fullmatch(r"ofType\(([A-Za-z]+)\)((?:\[\d+\])*)", part)
        if m:
            # choice type: the previous key was the element base name
            if out and isinstance(out[-1], str) and isinstance(prev, dict):
                key = out[-1] + m.group(1)[0].upper() + m.group(1)[1:]
                if key in prev:
                    out[-1] = key
                    cur = prev[key]
            continue
        m = re.fullmatch(r"(_?[A-Za-z][A-Za-z0-9_]*)((?:\[\d+\])*)", part)
        if not m or not isinstance(cur, dict):
            break
        name = m.group(1)
        prev = cur
        if name in cur:
            cur = cur[name]
        elif "_" + name in cur:
            name = "_" + name
            cur = cur[name]
        else:
            out.append(name)
            break
        out.append(name)
        for idx in re.findall(r"\[(\d+)\]", m.group(2)):
            i = int(idx)
            if isinstance(cur, list) and i < len(cur):
                cur = cur[i]
                out.append(i)
            else:
                return out
    return out


class _Scanner:
    """Finds the (line, column) where each value starts, for the requested JSON paths only."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.found: dict[tuple[str | int, ...], int] = {}
        self.decoder = json.JSONDecoder()

    def ws(self) -> None:
        t = self.text
        while self.pos < len(t) and t[self.pos] in " \t\r\n":
            self.pos += 1

    def value(self, path: tuple[str | int, ...], wanted: set[tuple[str | int, ...]]) -> None:
        self.ws()
        if path in wanted:
            self.found[path] = self.pos
        if not any(w[: len(path)] == path and len(w) > len(path) for w in wanted):
            self.skip()
            return
        c = self.text[self.pos]
        if c == "{":
            self.pos += 1
            self.ws()
            if self.text[self.pos] == "}":
                self.pos += 1
                return
            while True:
                self.ws()
                key_start = self.pos
                key, self.pos = json.decoder.scanstring(self.text, self.pos + 1)
                kp = (*path, key)
                if kp in wanted:
                    self.found[(*kp, "@key")] = key_start
                self.ws()
                self.pos += 1  # ':'
                self.value(kp, wanted)
                self.ws()
                if self.text[self.pos] == ",":
                    self.pos += 1
                    continue
                self.pos += 1
                return
        if c == "[":
            self.pos += 1
            self.ws()
            if self.text[self.pos] == "]":
                self.pos += 1
                return
            i = 0
            while True:
                self.value((*path, i), wanted)
                self.ws()
                if self.text[self.pos] == ",":
                    self.pos += 1
                    i += 1
                    continue
                self.pos += 1
                return
        self.skip()

    def skip(self) -> None:
        _, end = self.decoder.raw_decode(self.text, self.pos)
        self.pos = end

    def line_col(self, offset: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return line, col


def add_positions(issues: list[Issue], resource: Any, source: bytes) -> None:
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    paths: dict[int, tuple[str | int, ...]] = {}
    for n, issue in enumerate(issues):
        if issue.expression:
            paths[n] = tuple(json_path(resource, issue.expression[0]))
    wanted = set(paths.values())
    # Every prefix, so the scanner descends into them.
    prefixes = {p[:k] for p in wanted for k in range(len(p) + 1)}
    sc = _Scanner(text)
    try:
        sc.value((), prefixes)
    except (ValueError, IndexError):
        return
    for n, p in paths.items():
        off = sc.found.get((*p, "@key")) if p and isinstance(p[-1], str) else None
        if off is None:
            while p and p not in sc.found:
                p = p[:-1]
            off = sc.found.get(p)
        if off is None:
            continue
        line, col = sc.line_col(off)
        issue = issues[n]
        issue.extensions = [*issue.extensions, {"url": LINE_EXT, "valueInteger": line},
                            {"url": COL_EXT, "valueInteger": col}]
        issue.details_text = f"{issue.diagnostics} (line {line}, column {col})"
