"""The example in docs/policies.md parses, and its explanation is what the code says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import privacy_filters
from privacy_filters import explain_policy, parse_policy, policy_to_doc

DOC = Path(privacy_filters.__file__).resolve().parents[1] / "docs" / "policies.md"


def test_example_parses_and_explains() -> None:
    text = DOC.read_text("utf-8")
    example = re.search(r"<!-- policy-example -->\n```json\n(.*?)```", text, re.S)
    explained = re.search(r"<!-- policy-explain -->\n((?:- .*\n)+)", text)
    assert example and explained
    policy = parse_policy(json.loads(example[1]))
    assert parse_policy(policy_to_doc(policy)) == policy
    sentences = [line[2:] for line in explained[1].splitlines()]
    assert explain_policy(policy) == sentences
