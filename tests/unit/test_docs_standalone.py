"""The project's documentation stands alone: users have the repository, not the
design notes it grew from, so no page, doc string or web page sends them there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ELSEWHERE = re.compile(r"\.\./shared|\b(ARCHITECTURE|POLICY|PROTOCOL|STYLE|FIELD-NOTES)\.md\b")


def test_no_document_points_outside_the_repository() -> None:
    files = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "load_tests" / "RESULTS.md",
             *sorted((REPO / "docs").glob("*.md"))]
    for package in ("mdm_server", "privacy_filters", "agent_protocol", "load_tests"):
        files += sorted((REPO / package).rglob("*.py"))
    files += sorted((REPO / "mdm_server" / "web").rglob("*.*"))
    found = [f"{f.relative_to(REPO)}:{n}" for f in files
             for n, line in enumerate(f.read_text("utf-8").splitlines(), 1)
             if ELSEWHERE.search(line)]
    assert len(files) > 50
    assert not found, found
