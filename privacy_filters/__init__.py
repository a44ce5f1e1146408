"""Collection and masking policies applied before anything is stored.

Pure: no I/O, no networking, no asyncio. A policy document is parsed and validated
(:func:`parse_policy`), compiled once per version (:func:`compile_policy`), then
applied to batches of validated telemetry on the ingest hot path
(:meth:`CompiledPolicy.filter_batch`). :func:`explain_policy` tells the user, in
plain words, what the policy does. See docs/policies.md.
"""

from privacy_filters.actions import (
    DROP,
    HASH_PREFIX,
    coarsen,
    coarsener,
    hash_value,
    hasher,
    mask,
    masker,
)
from privacy_filters.compile import CheckedOut, CompiledPolicy, FilterResult, compile_policy
from privacy_filters.errors import PolicyError, PolicyIssue
from privacy_filters.explain import explain_policy
from privacy_filters.location import MAX_VERTICES, MAX_ZONES, snap
from privacy_filters.policy import (
    ACTIONS,
    DEFAULT_RETENTION_DAYS,
    OPEN_DEFAULT,
    OWNERSHIPS,
    STRICT_PERSONAL,
    ActionName,
    AppliesTo,
    FieldRule,
    LocationRules,
    Policy,
    parse_policy,
    policy_to_doc,
    select_policy,
)

__all__ = [
    "ACTIONS",
    "DEFAULT_RETENTION_DAYS",
    "DROP",
    "HASH_PREFIX",
    "MAX_VERTICES",
    "MAX_ZONES",
    "OPEN_DEFAULT",
    "OWNERSHIPS",
    "STRICT_PERSONAL",
    "ActionName",
    "AppliesTo",
    "CheckedOut",
    "CompiledPolicy",
    "FieldRule",
    "FilterResult",
    "LocationRules",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "coarsen",
    "coarsener",
    "compile_policy",
    "explain_policy",
    "hash_value",
    "hasher",
    "mask",
    "masker",
    "parse_policy",
    "policy_to_doc",
    "select_policy",
    "snap",
]
