"""The one exception of the package: a policy document or object that is not valid.

Privacy rule: messages name policy paths and policy values (admin configuration),
never a telemetry value.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PolicyError", "PolicyIssue"]


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy: where (``fields["identity.imei"].keep_last``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '(policy)'}: {self.message}"


class PolicyError(ValueError):
    """A policy is invalid. ``issues`` lists every problem found, in document order.

    The administrator is at fault (an HTTP edge answers 422 with ``issues``).
    """

    issues: tuple[PolicyIssue, ...]

    def __init__(self, issues: tuple[PolicyIssue, ...] | list[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(str(i) for i in self.issues) or "invalid policy")

    def __repr__(self) -> str:
        return f"PolicyError(issues={self.issues!r})"
