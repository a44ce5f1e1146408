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
from privacy_filters.explain import beyond_floor, explain_policy
from privacy_filters.floor import (
    FLOOR_ID,
    FLOOR_SUFFIX,
    PERSONAL_FLOOR,
    FloorUse,
    Resolution,
    merge_policies,
    resolve_policy,
    stricter_rule,
)
from privacy_filters.location import MAX_VERTICES, MAX_ZONES, snap
from privacy_filters.policy import (
    ACTIONS,
    DEFAULT_RETENTION_DAYS,
    FEW_VALUES,
    OPEN_DEFAULT,
    OWNERSHIPS,
    ActionName,
    AppliesTo,
    FieldRule,
    LocationRules,
    Policy,
    parse_policy,
    policy_to_doc,
    policy_warnings,
    select_policy,
)

__all__ = [
    "ACTIONS",
    "DEFAULT_RETENTION_DAYS",
    "DROP",
    "FEW_VALUES",
    "FLOOR_ID",
    "FLOOR_SUFFIX",
    "HASH_PREFIX",
    "MAX_VERTICES",
    "MAX_ZONES",
    "OPEN_DEFAULT",
    "OWNERSHIPS",
    "PERSONAL_FLOOR",
    "ActionName",
    "AppliesTo",
    "CheckedOut",
    "CompiledPolicy",
    "FieldRule",
    "FilterResult",
    "FloorUse",
    "LocationRules",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "Resolution",
    "beyond_floor",
    "coarsen",
    "coarsener",
    "compile_policy",
    "explain_policy",
    "hash_value",
    "hasher",
    "mask",
    "masker",
    "merge_policies",
    "parse_policy",
    "policy_to_doc",
    "policy_warnings",
    "resolve_policy",
    "select_policy",
    "snap",
    "stricter_rule",
]
