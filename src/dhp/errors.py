"""Errors every layer raises; ``api`` turns them into HTTP status + OperationOutcome in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MESSAGE_SYSTEM = "https://dhp.uz/fhir/CodeSystem/dhp-message-id"


@dataclass
class Issue:
    severity: str  # fatal | error | warning | information
    code: str  # IssueType code: invalid, structure, required, not-found, conflict, …
    diagnostics: str
    expression: list[str] = field(default_factory=list)
    message_id: str | None = None  # stable id integrators can match on
    details_text: str | None = None
    extensions: list[dict[str, Any]] = field(default_factory=list)

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.extensions:
            out = {"extension": self.extensions, **out}
        if self.message_id or self.details_text:
            details: dict[str, Any] = {}
            if self.message_id:
                details["coding"] = [{"system": MESSAGE_SYSTEM, "code": self.message_id}]
            details["text"] = self.details_text or self.diagnostics
            out["details"] = details
        out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def outcome(issues: list[Issue] | Issue) -> dict[str, Any]:
    if isinstance(issues, Issue):
        issues = [issues]
    if not issues:
        issues = [Issue("information", "informational", "All OK", message_id="ok")]
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class FHIRError(Exception):
    """An error with an HTTP status and the issues that explain it."""

    def __init__(self, status: int, diagnostics: str = "", code: str = "processing", *,
                 expression: list[str] | str | None = None, message_id: str | None = None,
                 issues: list[Issue] | None = None, headers: dict[str, str] | None = None) -> None:
        if isinstance(expression, str):
            expression = [expression]
        self.status = status
        self.issues = issues or [Issue("error", code, diagnostics, expression or [], message_id)]
        self.headers = headers or {}
        super().__init__(diagnostics or (self.issues[0].diagnostics if self.issues else ""))

    def outcome(self) -> dict[str, Any]:
        return outcome(self.issues)


def bad_request(msg: str, expression: list[str] | str | None = None, message_id: str = "bad-request",
                code: str = "invalid") -> FHIRError:
    return FHIRError(400, msg, code, expression=expression, message_id=message_id)


def not_found(msg: str, message_id: str = "not-found") -> FHIRError:
    return FHIRError(404, msg, "not-found", message_id=message_id)
