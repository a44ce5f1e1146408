"""GET /api/v1/openapi.json: the OpenAPI 3.1 document of the whole HTTP API (no token).

Built in code from the constants the handlers use (kinds, command types and states,
limits), so a value changed there changes here. The shapes follow the handlers
exactly; ``tests/integration/test_openapi.py`` keeps it true: every route the app
registers under ``/api/v1`` is in the document and every documented operation the
server serves is fuzzed with schemathesis (no 5xx, every answer matches its schema).

Objects the server answers with are closed (``additionalProperties: false``) and list
every field it always sends as required, so a field added to a handler and not here
fails that test. Request bodies are closed where the server refuses unknown fields.
"""

from __future__ import annotations

from functools import cache
from typing import Any, get_args

import orjson
from aiohttp import web

from agent_protocol import CONSENT_TYPES, KINDS, REMOTE_VIEW_MODES, WIPE_SCOPES
from mdm_server.agents import AGENTS
from mdm_server.analysis.trips import BOUNDS, PATH_MAX, Params
from mdm_server.api.commands import (
    ADMIN_COMMAND_TYPES,
    IDEMPOTENCY_KEY_MAX,
    LIST_LIMIT_MAX,
    REASON_MAX,
    TTL_DEFAULT_REMOTE_VIEW_S,
    TTL_DEFAULT_S,
    TTL_MAX_S,
    TTL_MIN_S,
)
from mdm_server.api.limits import BODY_LIMIT, NO_BODY_LIMIT, POLICY_BODY_LIMIT, public
from mdm_server.api.places import PLACE_BODY_LIMIT
from mdm_server.api.reports import (
    CSV_LIMIT_MAX,
    CSV_TYPE,
    JSON_LIMIT_MAX,
    LIMIT_DEFAULT,
    OVERDUE_MAX,
    RANGE_DEFAULT_DAYS,
    RANGE_MAX_DAYS,
    USER_MAX,
)
from mdm_server.api.trips import MAX_POINTS, MAX_RANGE
from mdm_server.commands.service import NOTICE_KINDS, NOTICE_TYPES
from mdm_server.commands.states import STATES
from mdm_server.reports.shifts import CONDITION_FIELDS, SIDE_FIELDS, STATUSES
from mdm_server.storage.shifts import OVERDUE_MAX_S, OVERDUE_MIN_S, SCAN_MAX
from mdm_server.storage.tokens import TOKEN_STATES
from privacy_filters import ACTIONS, DEFAULT_RETENTION_DAYS, OWNERSHIPS, FloorUse
from privacy_filters.policy import (
    MASK_MAX,
    PRECISION_MAX_M,
    PRECISION_MIN_M,
    RETENTION_MAX_DAYS,
    RETENTION_MIN_DAYS,
)

__all__ = ["PATH", "document", "routes"]

PATH = "/api/v1/openapi.json"
Schema = dict[str, Any]

ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
#: Every command type a stored command can have (trust_key and distrust_key are the
#: server's own).
ALL_COMMAND_TYPES = (*ADMIN_COMMAND_TYPES, "trust_key", "distrust_key")
ERASURE_STATES = ("pending", "fulfilled", "refused")
NOTICE_TEXT_MAX = 4000  # agent_protocol.commands.NOTICE_TEXT_MAX
REFUSAL_MAX = 1000
FLOOR_USES: tuple[str, ...] = get_args(FloorUse)

# --- schema helpers ------------------------------------------------------------------


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    if "type" in schema and isinstance(schema["type"], str):
        out = {**schema, "type": [schema["type"], "null"]}
        if "enum" in schema:  # an enum lists every allowed value: null too
            out["enum"] = [*schema["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *,
        closed: bool = True, description: str | None = None) -> Schema:
    """An object with these required (and optional) properties."""
    out: Schema = {"type": "object", "properties": {**required, **(optional or {})}}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def enum(values: tuple[str, ...] | list[str], **extra: Any) -> Schema:
    return {"type": "string", "enum": list(values), **extra}


STRING: Schema = {"type": "string"}
TEXT: Schema = {"type": "string", "pattern": "^[^\\u0000]*$"}  # PostgreSQL refuses NUL
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
COUNT: Schema = {"type": "integer", "minimum": 0}
BOOLEAN: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time"}
ID: Schema = {"type": "string", "pattern": ID_PATTERN}
UUID: Schema = {"type": "string", "format": "uuid"}
ANY_OBJECT: Schema = {"type": "object"}
LINES: Schema = array(STRING, description="plain-language lines for the device's user")
NEXT: Schema = {"type": ["string", "null"],
                "description": "the `cursor` of the next page; null on the last page"}


def page(key: str, item: Schema) -> Schema:
    """A page of a list: the items and the cursor of the next page."""
    return obj({key: array(item), "next": NEXT})


def listing(key: str, item: Schema) -> Schema:
    return obj({key: array(item)})


# --- components: schemas -------------------------------------------------------------

NOTICE = obj({"text": {**TEXT, "minLength": 1, "maxLength": NOTICE_TEXT_MAX}},
             {"lang": {"type": "string", "pattern": "^[A-Za-z0-9-]{2,35}$", "default": "en"}},
             description="What the device shows its user before it acts.")

_REASON = {"type": "string", "minLength": 1, "maxLength": REASON_MAX,
           "pattern": "^[^\\u0000]*\\S[^\\u0000]*$",
           "description": "why the command is sent (1-500 characters, not blank)"}
_TTL = {"type": "integer", "minimum": TTL_MIN_S, "maximum": TTL_MAX_S, "default": TTL_DEFAULT_S,
        "description": "seconds until an undelivered command expires"}


def _command_request(types: tuple[str, ...], *, scope: bool = False,
                     notice: bool = True) -> Schema:
    required: dict[str, Schema] = {"type": enum(types), "reason": ref("CommandReason")}
    if scope:
        required["scope"] = enum(WIPE_SCOPES, description="managed: company apps and data "
                                 "only; full: everything (never on a personal device)")
    optional: dict[str, Schema] = {"ttl_s": ref("CommandTtl")}
    if notice:
        optional["notice"] = ref("Notice")
    return obj(required, optional)


def _remote_view_request() -> Schema:
    """A remote view: the user is asked with the notice, so it is required."""
    return obj({"type": enum(("remote_view",)),
                "mode": enum(REMOTE_VIEW_MODES, description="screenshot: one picture of the "
                             "screen; session: a live view until the user ends it"),
                "reason": {"allOf": [ref("CommandReason")],
                           "description": "why the command is sent; shown to the user too"},
                "notice": ref("Notice")},
               {"ttl_s": {**_TTL, "default": TTL_DEFAULT_REMOTE_VIEW_S,
                          "description": "seconds the user has to answer"}},
               description="The device's user is asked; nothing happens on the device "
                           "without their yes (docs/commands.md, \"Remote view\").")


#: A command as the API shows it (mdm_server.commands.service.command_json).
COMMAND_FIELDS: dict[str, Schema] = {
    "command_id": UUID,
    "device": STRING,
    "type": enum(ALL_COMMAND_TYPES),
    "params": {**ANY_OBJECT,
               "description": "wipe: {scope}; remote_view: {mode, reason}; trust_key: the "
                              "new key; distrust_key: {key_id}"},
    "notice": nullable(ref("Notice")),
    "state": enum(STATES),
    "reason": nullable(STRING),
    "requested_by": STRING,
    "approved_by": nullable(STRING),
    "approved_at": nullable(TIME),
    "cancelled_by": nullable(STRING),
    "created_at": TIME,
    "issued_at": nullable(TIME),
    "sent_at": nullable(TIME),
    "received_at": nullable(TIME),
    "notice_shown_at": nullable(TIME),
    "consent_at": {**nullable(TIME), "description": "when the user answered (remote_view)"},
    "finished_at": nullable(TIME),
    "expires_at": TIME,
    "outcome_detail": nullable(STRING),
    "send_count": COUNT,
}

SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {"error": {"type": "string", "description": "what is wrong, in words; never quotes "
                                                    "a value from the request"}},
        {"code": {"type": "string", "description": "machine-readable reason"},
         "issues": array(ref("Issue"), description="every problem found"),
         # POST /policies/{name}:preview, a sample payload that is not valid telemetry:
         "reason": {"type": "string", "description": "the wire-protocol reason (preview)"},
         "detail": {"type": "string"},
         "path": {"type": ["string", "null"]},
         # 409 unsupported_by_agent: the devices whose agent cannot carry it out.
         "devices": array(obj({"device": STRING, "agent": enum(AGENTS)}),
                          description="devices whose agent cannot carry out the command "
                                      "(code unsupported_by_agent)")}),
    "Issue": obj({"path": STRING, "message": STRING}),
    "Notice": NOTICE,
    "CommandReason": _REASON,
    "CommandTtl": _TTL,
    "CommandRequest": {
        "description": "A command to send. Any other field is refused (422), never ignored. "
                       f"Only {', '.join(NOTICE_TYPES)} carry a notice; without one the "
                       "tenant's template for the kind of command is used, else a built-in "
                       "English text.",
        "oneOf": [
            _command_request(tuple(t for t in NOTICE_TYPES
                                    if t != "wipe" and t not in CONSENT_TYPES)),
            _command_request(("wipe",), scope=True),
            _remote_view_request(),
            _command_request(tuple(t for t in ADMIN_COMMAND_TYPES if t not in NOTICE_TYPES),
                             notice=False),
        ],
    },
    "Command": obj(COMMAND_FIELDS),
    "CommandWithEvents": obj({**COMMAND_FIELDS, "events": array(
        ref("CommandEvent"), description="every step of its life, in order")}),
    "CommandEvent": obj({
        "at": TIME, "event": STRING, "from": nullable(enum(STATES)),
        "to": nullable(enum(STATES)), "accepted": BOOLEAN, "detail": nullable(STRING),
        "actor": nullable(STRING)}),
    "CommandBatch": obj({
        "batch_id": UUID, "group": STRING, "type": enum(ADMIN_COMMAND_TYPES),
        "params": ANY_OBJECT, "reason": STRING, "requested_by": STRING, "created_at": TIME,
        "commands": {**COUNT, "description": "commands created"},
        "refused": array(obj({"device": STRING, "code": STRING}),
                         description="devices the guards skipped (personal_device; "
                                     "unsupported_by_agent: their agent cannot carry it "
                                     "out)"),
        "states": {"type": "object", "propertyNames": enum(STATES),
                   "additionalProperties": COUNT,
                   "description": "how many of the batch's commands are in each state"},
        "finished": COUNT, "done": BOOLEAN}),
    "NoticeLogEntry": obj({
        "command_id": UUID, "type": enum(NOTICE_TYPES), "params": ANY_OBJECT,
        "notice": nullable(ref("Notice")), "state": enum(STATES), "requested_at": TIME,
        "sent_at": nullable(TIME), "received_at": nullable(TIME),
        "notice_shown_at": nullable(TIME),
        "consent": {"enum": ["given", "refused", None],
                    "description": "the user's answer, where they were asked (remote_view)"},
        "consent_at": nullable(TIME), "finished_at": nullable(TIME),
        "outcome_detail": nullable(STRING),
        "agent_form": {**nullable(ANY_OBJECT),
                       "description": "what was sent to a foreign agent, in its own form "
                                      "(OwnTracks: {\"_type\": \"cmd\", \"action\": "
                                      "\"reportLocation\"}); null for our own agent"}},
        description="A command that affected the device's user, with the notice as sent."),
    "NoticeTemplate": obj({"kind": enum(NOTICE_KINDS), "text": STRING, "lang": STRING,
                           "source": enum(("tenant", "built_in"))}),
    "NoticeTemplateRequest": obj({"text": NOTICE["properties"]["text"],
                                  "lang": {"type": "string", "pattern": "^[A-Za-z0-9-]{2,35}$"}}),
    # Policies (docs/policies.md)
    "FieldRule": obj(
        {"action": enum(ACTIONS)},
        {"keep_last": {"type": "integer", "minimum": 0, "maximum": MASK_MAX},
         "keep_first": {"type": "integer", "minimum": 0, "maximum": MASK_MAX},
         "step": {"type": "number", "exclusiveMinimum": 0}},
        description="keep, drop, hash: no other key; mask: exactly one of keep_last and "
                    "keep_first; coarsen: step"),
    "Zone": {"type": "object", "required": ["type"],
             "properties": {"type": enum(("Polygon", "MultiPolygon", "Feature"))},
             "description": "a GeoJSON Polygon or MultiPolygon, or a Feature of one "
                            "([lon, lat], RFC 7946)"},
    "Policy": obj({}, {
        "name": ID,
        "applies_to": obj({}, {"ownership": nullable(enum(OWNERSHIPS)),
                               "groups": array(ID)}),
        "collect": obj({}, {k: BOOLEAN for k in KINDS}),
        "fields": {"type": "object",
                   "propertyNames": {"type": "string",
                                     "pattern": f"^({'|'.join(KINDS)})\\.[a-z_.]+$"},
                   "additionalProperties": ref("FieldRule"),
                   "description": 'rules by "<kind>.<field>"'},
        "location": obj({}, {
            "precision_m": nullable({"type": "number", "minimum": PRECISION_MIN_M,
                                     "maximum": PRECISION_MAX_M}),
            "only_inside": array(ref("Zone")),
            "never_inside": array(ref("Zone")),
            "only_while_checked_out": BOOLEAN}),
        "retention_days": {"type": "object", "propertyNames": enum((*KINDS, "default")),
                           "additionalProperties": {"type": "integer",
                                                    "minimum": RETENTION_MIN_DAYS,
                                                    "maximum": RETENTION_MAX_DAYS},
                           "description": f"days per kind; default {DEFAULT_RETENTION_DAYS}"},
    }, description="A collection and masking policy (docs/policies.md). Unknown keys, at "
                   "any level but inside GeoJSON, are refused."),
    "PolicyWarning": obj({"path": STRING, "message": STRING},
                         description="a valid but weak choice (e.g. hash of an IMEI) and "
                                     "what to do instead"),
    "PolicyVersion": obj(
        {"name": ID, "version": {"type": "integer", "minimum": 1}, "deleted": BOOLEAN,
         "pruned": {**BOOLEAN, "description": "its body was dropped to keep the tenant's "
                                               "policies under their cap (its number, "
                                               "author and time stay)"},
         "bytes": {**COUNT, "description": "the size of its body as stored, as counted "
                                           "against the cap; 0: none"},
         "created_at": TIME, "created_by": STRING},
        {"policy": ref("Policy"), "explanation": LINES,
         "warnings": array(ref("PolicyWarning"))},
        description="One version of a policy; `policy` (canonical form), `explanation` "
                    "and `warnings` where it has a body and one is asked for (not in lists, "
                    "not a deletion, not a pruned version)."),
    "PolicyList": obj({
        "policies": array(ref("PolicyVersion"),
                          description="the newest version of each, without bodies"),
        "personal_floor": obj({"id": STRING, "policy": ref("Policy"), "explanation": LINES},
                              description="the built-in floor of personal devices"),
        "personal_devices": array(obj({
            "policy": {**STRING, "description": "the id stamped on the records"},
            "base": nullable(ID), "version": INTEGER, "floor": enum(FLOOR_USES),
            "devices": array(ID)}),
            description="which policy decides for each enrolled personal device"),
        "storage": obj({"bytes": COUNT, "cap_bytes": COUNT},
                       description="what the tenant's stored versions take, and the cap "
                                   "(MDM_POLICY_STORE_MB)")}),
    "PreviewRequest": obj(
        {"kind": enum(KINDS)},
        {"policy": ref("Policy"),
         "payload": {"description": "a telemetry envelope as a device would publish it "
                                    "(docs/protocol.md)"},
         "checked_out": {**BOOLEAN, "default": True}},
        closed=False,
        description="Run a draft `policy` (else the stored one) over a sample payload."),
    "Preview": obj({
        "collected": BOOLEAN,
        "stored": array(obj({"id": STRING, "ts_ms": INTEGER, "data": ANY_OBJECT})),
        "suppressed": array(STRING, description="ids of points not stored"),
        "explanation": LINES,
        "hash_key": enum(("ephemeral",), description="hashes use a key made for this "
                                                     "request: they never match stored ones"),
        "hash_note": STRING,
        "warnings": array(ref("PolicyWarning"))}),
    "DevicePolicy": obj({
        "policy": {**STRING, "description": "the id stamped on the records it shapes"},
        "base": nullable(ID), "version": INTEGER, "floor": enum(FLOOR_USES),
        "collects": obj({k: BOOLEAN for k in KINDS})},
        description="the policy in force for the device; `floor`: none (not personal), "
                    "merged (with the personal-device floor), relaxed (a policy for "
                    "personal devices, as written), only (the floor alone)"),
    # Devices and their data
    "DeviceSummary": obj({
        "device": ID, "ownership": enum(OWNERSHIPS), "groups": array(ID),
        "status": enum(("enrolled", "revoked")), "enrolled_at": TIME,
        "last_seen_at": nullable(TIME), "agent": ref("Agent")}),
    "Agent": enum(AGENTS, description="the app that reports for the device: native (our "
                                      "agent) or a foreign one (docs/agents.md)"),
    "Presence": nullable(obj(
        {"online": BOOLEAN, "changed_at": TIME,
         "source": enum(("lwt", "status", "message"))},
        description="as its agent says: lwt (the broker published its will: offline), "
                    "any other message (a sign of life: online); null: not known")),
    "Device": obj({
        "device": ID, "ownership": enum(OWNERSHIPS), "groups": array(ID),
        "status": enum(("enrolled", "revoked")), "enrolled_at": TIME,
        "agent": ref("Agent"), "presence": ref("Presence"),
        "user_email": nullable(STRING), "last_seen_at": nullable(TIME),
        "last": {"type": "object", "propertyNames": enum(KINDS),
                 "additionalProperties": obj({"id": STRING, "ts": TIME, "received_at": TIME,
                                              "data": ANY_OBJECT}),
                 "description": "the newest record of each kind held"},
        "policy": ref("DevicePolicy")}),
    "Record": obj({
        "kind": enum(KINDS), "id": STRING, "ts": TIME, "received_at": TIME,
        "policy": nullable(STRING), "policy_version": nullable(INTEGER),
        "data": ANY_OBJECT}, description="A telemetry record exactly as stored."),
    # Location history analysis and named places (issue 11; docs/api.md, "Trips")
    **{
        "TripParameters": obj({k: {"type": "number", "minimum": 0} for k in BOUNDS},
                              description="metres and seconds"),
        "TripEnd": obj({"at": TIME, "lat": NUMBER, "lon": NUMBER,
                        "places": array(ID, description="the places it is in")}),
        "Trip": obj({
            "start": ref("TripEnd"), "end": ref("TripEnd"),
            "distance_m": {**NUMBER, "description": "sum of great-circle segments"},
            "duration_s": NUMBER, "avg_speed_mps": NUMBER, "max_speed_mps": NUMBER,
            "points": COUNT,
            "path": array(array(NUMBER, minItems=2, maxItems=2), maxItems=PATH_MAX,
                          description=f"[lon, lat] positions, at most {PATH_MAX}")}),
        "Stop": obj({"lat": NUMBER, "lon": NUMBER, "places": array(ID), "arrival": TIME,
                     "departure": TIME, "duration_s": NUMBER, "points": COUNT}),
        "DataGap": obj({"from": TIME, "to": TIME, "duration_s": NUMBER},
                       description="no point for longer than max_gap_s: ends a trip"),
        "PlaceEvent": obj({"place": ID, "event": enum(("enter", "leave")), "at": TIME}),
        "TripDay": obj({
            "date": {"type": "string", "format": "date",
                     "description": "a calendar day in `tz`"},
            "distance_m": NUMBER, "moving_s": NUMBER, "stopped_s": NUMBER,
            "trips": {**COUNT, "description": "trips that began that day"},
            "stops": {**COUNT, "description": "stops that began that day"},
            "places": array(obj({"name": ID, "seconds": NUMBER}),
                            description="time in each place that day")}),
        "Trips": obj({
            "device": ID, "from": TIME, "to": TIME, "tz": STRING,
            "parameters": {**ref("TripParameters"),
                           "description": "as used: raised to the precision"},
            "asked": ref("TripParameters"),
            "precision": obj({
                "precision_m": {**nullable(NUMBER), "description": "the coarsest grid the "
                                "range's points were snapped to; null: none"},
                "policies": array(obj({
                    "policy": nullable(STRING), "version": nullable(INTEGER),
                    "points": COUNT, "precision_m": nullable(NUMBER),
                    "known": {**BOOLEAN, "description": "false: that version's body is "
                              "no longer stored; precision_m is then the largest "
                              "accuracy its points state"}}),
                    description="the policy versions stamped on the points read")}),
            "suppressed": obj({"points": COUNT, "days": array({"type": "string",
                                                               "format": "date"})},
                              description="points the policy kept out of storage on the "
                                          "range's UTC days"),
            "places": array(obj({"name": ID, "version": INTEGER,
                                 "smaller_than_precision": BOOLEAN}),
                            description="the places in force, as used"),
            "notes": LINES, "points": COUNT,
            "trips": array(ref("Trip")), "stops": array(ref("Stop")),
            "gaps": array(ref("DataGap")), "events": array(ref("PlaceEvent")),
            "days": array(ref("TripDay"))}),
        "PlaceVersion": obj(
            {"name": ID, "version": {"type": "integer", "minimum": 1}, "deleted": BOOLEAN,
             "pruned": BOOLEAN, "bytes": COUNT, "created_at": TIME, "created_by": STRING},
            {"place": ref("Zone"), "area_m2": NUMBER},
            description="One version of a place; `place` and `area_m2` where it has a "
                        "body and one is asked for (not in lists, not a deletion, not "
                        "pruned)."),
        "PlaceList": obj({
            "places": array(ref("PlaceVersion"), description="the newest version of "
                            "each place in force, without bodies"),
            "next": NEXT,
            "storage": obj({"bytes": COUNT, "cap_bytes": COUNT},
                           description="what the tenant's stored place versions take, "
                                       "and the cap (MDM_PLACE_STORE_MB)")}),
    },
    "DeadLetter": obj({
        "id": INTEGER,
        "hour": {**TIME, "description": "the UTC hour counted (its start)"},
        "first_seen": TIME, "last_seen": TIME,
        "count": {"type": "integer", "minimum": 1,
                  "description": "messages refused that hour for this device, reason "
                                 "and topic"},
        "topic": {**STRING, "description": "what of the topic parsed; the level that did "
                                           "not is named in braces, never its value; "
                                           "`mdm/v1/{tenant}/devices/{device}/#` for "
                                           "`rate_limited`"},
        "device": nullable(STRING),
        "level": {"anyOf": [enum(("prefix", "tenant", "device", "channel", "kind", "extra")),
                            {"type": "null"}],
                  "description": "the topic level that failed; null when the topic parsed"},
        "reason": {**STRING, "description": "why: a protocol reason (`not_json`, "
                                            "`bad_topic`, ...), `unknown_device`, "
                                            "`storage_refused`, or `rate_limited` (over "
                                            "the device's ingest rate limit: "
                                            "acknowledged, deliberately not stored)"},
        "detail": {**STRING, "description": "the first message's: names fields, never "
                                            "values"},
        "payload_bytes": {**COUNT, "description": "the messages' total size"}},
        description="Input that was refused, counted per device, reason, topic and hour: "
                    "why and how much, never a payload."),
    "AuditEntry": obj({
        "seq": {"type": "integer", "minimum": 1}, "at": TIME, "tenant": nullable(STRING),
        "actor": STRING, "action": STRING, "target": STRING, "details": ANY_OBJECT,
        "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "integrity": enum(("verified", "legacy", "invalid"), description=(
            "`verified`: its MAC checks under the server's key; `legacy`: written before "
            "entries were MAC'd (only `mdm-server audit verify` vouches for it); "
            "`invalid`: its MAC does not check: forged or altered, not written by the "
            "server"))},
        description="`seq` counts this tenant's entries only"),
    "ErasureRequest": obj(
        {"id": UUID, "device": ID, "state": enum(ERASURE_STATES), "requested_at": TIME,
         "due_at": {**TIME, "description": "fulfilled automatically then unless an admin "
                                           "acted"}},
        {"decided_by": nullable(STRING), "decided_at": nullable(TIME),
         "refusal_reason": nullable(STRING),
         "erased": nullable({"type": "object", "additionalProperties": COUNT,
                             "description": "rows removed, per kind of data"})}),
    "TokenInfo": obj({"tenant": ID, "role": enum(("admin", "auditor", "user")),
                      "name": STRING, "device": nullable(ID)}),
    "Token": obj({
        "id": {**UUID, "description": "the token's public id (random; never the token)"},
        "role": enum(("admin", "auditor", "user")), "name": STRING,
        "device": {**nullable(ID), "description": "a user token's device"},
        "created_at": TIME, "expires_at": TIME,
        "last_used_at": {**nullable(TIME), "description": "written at most once a minute"},
        "revoked_at": nullable(TIME),
        "state": enum(TOKEN_STATES, description="active: it works; expired or revoked: "
                                                "refused (401) on every route")},
        description="An API token as listed: never the token, nor its digest"),
    # The device user's view
    "MyDevice": obj({"device": ID, "ownership": enum(OWNERSHIPS),
                     "status": enum(("enrolled", "revoked")),
                     "enrolled_at": {**TIME, "description": "when the enrollment the token "
                                     "covers began: what the user reads starts there"}}),
    "MyDeviceSummary": obj({
        "device": ID, "ownership": enum(OWNERSHIPS), "status": enum(("enrolled", "revoked")),
        "enrolled_at": {**TIME, "description": "when the enrollment the token covers began"},
        "records": {"type": "object", "propertyNames": enum(KINDS),
                    "additionalProperties": COUNT,
                    "description": "records held per kind (every kind, 0 included)"},
        "total": COUNT,
        "last": {"type": "object", "propertyNames": enum(KINDS),
                 "additionalProperties": obj({"id": STRING, "ts": TIME, "received_at": TIME,
                                              "data": ANY_OBJECT}),
                 "description": "the newest record of each kind held, exactly as stored"}}),
    "PolicyInForce": obj({
        "policy": STRING, "base": nullable(ID), "version": INTEGER, "floor": enum(FLOOR_USES),
        "collects": obj({k: BOOLEAN for k in KINDS}), "explanation": LINES,
        "beyond_floor": array(STRING, description="what a policy for personal devices "
                                                  "collects beyond the floor")}),
    "AccessLogEntry": obj({"at": TIME, "actor": STRING, "role": enum(("admin", "auditor")),
                           "what": {"type": "string",
                                    "description": "`device` (its detail), `data:<kind>`, "
                                                   "`trips` (the trips analysis), `shifts` "
                                                   "(the shift report) or `live` (its live "
                                                   "location watched: `watch` says start or "
                                                   "end)"},
                           "watch": nullable(enum(("start", "end"), description=(
                               "for `what: live`: the watch's start or end; else null"))),
                           "integrity": enum(("verified", "legacy"), description=(
                               "`verified`: signed by the server; `legacy`: recorded "
                               "before entries were signed. Entries that fail the check "
                               "are left out"))},
                          description="who in an admin role read this device's personal "
                                      "data, and when"),
    "ExportSummary": obj({"records": {"type": "object", "propertyNames": enum(KINDS),
                                      "additionalProperties": COUNT},
                          "total": COUNT}),
    "Health": obj({"status": enum(("ok",))}, {"ingest": obj({"broker_connected": BOOLEAN})},
                  description="no counters: the route is open to anyone"),
    "Live": obj({"status": enum(("alive",))}),
    "Ready": obj({"status": enum(("ready",))}),
    "NotReady": obj({"status": enum(("not ready",)),
                     "reason": enum(("database", "broker", "ingest_worker_exited",
                                     "ingest_worker_stalled"))},
                    description="why, in one word; nothing about any tenant"),
}

# --- components: parameters and responses --------------------------------------------


def _param(name: str, where: str, schema: Schema, description: str,
           required: bool | None = None) -> Schema:
    return {"name": name, "in": where, "required": where == "path" or bool(required),
            "schema": schema, "description": description}


PARAMETERS: dict[str, Schema] = {
    "Device": _param("device", "path", ID, "device id"),
    "Group": _param("group", "path", ID, "group id"),
    "CommandId": _param("command_id", "path", UUID, "command id"),
    "BatchId": _param("batch_id", "path", UUID, "batch id (a group request)"),
    "PolicyName": _param("name", "path", ID, "policy name"),
    "PolicyVersionNumber": _param("version", "path",
                                  {"type": "integer", "minimum": 1, "maximum": 999_999_999},
                                  "version number"),
    "NoticeKind": _param("kind", "path", enum(NOTICE_KINDS), "kind of command"),
    "RequestId": _param("request_id", "path", UUID, "erasure request id"),
    "TokenId": _param("token_id", "path", UUID, "a token's id (`id` in the listing)"),
    "TokenState": _param("state", "query", enum(TOKEN_STATES), "only tokens in this state"),
    "TokenCursor": _param("cursor", "query", UUID, "`next` of the previous page"),
    "Limit": _param("limit", "query", {"type": "integer", "minimum": 1,
                                       "maximum": LIST_LIMIT_MAX, "default": 100},
                    f"items per page, at most {LIST_LIMIT_MAX} (more is 400)"),
    "Cursor": _param("cursor", "query", STRING, "`next` of the previous page"),
    "CommandState": _param("state", "query", enum(STATES), "only commands in this state"),
    "ErasureState": _param("state", "query", enum(ERASURE_STATES),
                           "only requests in this state"),
    "Kind": _param("kind", "query", enum(KINDS), "telemetry kind", required=True),
    "From": _param("from", "query", TIME, "records with ts >= from (RFC 3339, with offset)"),
    "To": _param("to", "query", TIME, "records with ts < to (RFC 3339, with offset)"),
    "Place": _param("place", "path", ID, "place name"),
    "TripsFrom": _param("from", "query", TIME, "start of the range (RFC 3339, with offset)",
                        required=True),
    "TripsTo": _param("to", "query", TIME, f"end of the range, after `from`, at most "
                      f"{MAX_RANGE.days} days later", required=True),
    "Tz": _param("tz", "query", {"type": "string", "default": "UTC",
                                 "pattern": "^[A-Za-z][A-Za-z0-9_+\\-/]{0,63}$"},
                 "IANA time zone of the days (e.g. Europe/Amsterdam)"),
    **{f"Trip_{k}": _param(k, "query", {"type": "number", "minimum": lo, "maximum": hi,
                                        "default": getattr(Params(), k)},
                           "see docs/api.md, \"Trips\"")
       for k, (lo, hi) in BOUNDS.items()},
    "IdempotencyKey": _param(
        "Idempotency-Key", "header",
        {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX,
         "pattern": "^[\\x20-\\x7e]+$"},
        "your request id: the same key (per admin) and request gives the first answer "
        "again (200), one command; the same key with another request is 422"),
}


#: On every /api/ answer (mdm_server/api/limits.py).
API_HEADERS: dict[str, Schema] = {
    "Cache-Control": {"required": True, "schema": enum(("no-store",)),
                      "description": "no cache keeps an API answer"},
    "X-Content-Type-Options": {"required": True, "schema": enum(("nosniff",)),
                               "description": "no browser reads it as another type"},
}


def _error(description: str, headers: dict[str, Schema] | None = None) -> Schema:
    return {"description": description, "headers": {**(headers or {}), **API_HEADERS},
            "content": {"application/json": {"schema": ref("Error")}}}


#: Status -> (component name, response).
ERRORS: dict[int, tuple[str, Schema]] = {
    400: ("BadRequest", _error("malformed request: bad JSON, a bad query parameter")),
    401: ("Unauthorized", _error("no token, or not a valid one: unknown, expired or "
                                 "revoked (a user token: also its device re-enrolled)", {
        "WWW-Authenticate": {"required": True, "schema": enum(("Bearer",))}})),
    403: ("Forbidden", _error("a route of another role (or, for a command, a guard: "
                              "personal_device, same_admin, group_factory_reset)")),
    404: ("NotFound", _error("not found, or not the caller's: indistinguishable")),
    409: ("Conflict", _error("the state does not allow it (`code` says why)")),
    413: ("PayloadTooLarge", _error(
        f"the body is over the route's limit: {POLICY_BODY_LIMIT // 2**20} MiB for a policy "
        f"or a preview, {PLACE_BODY_LIMIT // 2**20} MiB for a place, "
        f"{BODY_LIMIT // 1024} KiB for other JSON bodies, "
        f"{NO_BODY_LIMIT // 1024} KiB where the route takes none; counted as it is read, "
        "with or without Content-Length")),
    415: ("UnsupportedMediaType", _error(
        "a body that is not JSON: every body is `Content-Type: application/json` (UTF-8)")),
    422: ("Invalid", _error("invalid: every problem in `issues`, with its path")),
    429: ("TooManyRequests", _error(
        "rate limited (per token, or per client address without a valid one; "
        "`Retry-After` says when to try again), or an export already running",
        {"Retry-After": {"required": False,
                         "schema": {"type": "string", "pattern": "^[0-9]+$"}}})),
}


def _json(schema: Schema, description: str, headers: dict[str, Schema] | None = None
          ) -> Schema:
    out: Schema = {"description": description,
                   "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


_LOCATION = {"Location": {"required": True, "schema": STRING,
                          "description": "where the created resource is read"}}

# --- operations -----------------------------------------------------------------------

ADMIN, READER, USER = ("admin",), ("admin", "auditor"), ("user",)
ANY_ROLE = ("admin", "auditor", "user")
_ROLE_TEXT = {ADMIN: "an admin", READER: "an admin or an auditor",
              USER: "a device user (token of one of their devices)",
              ANY_ROLE: "any valid token"}


def op(op_id: str, summary: str, *, tag: str, roles: tuple[str, ...] | None,
       ok: dict[int, Schema], errors: tuple[int, ...] = (),
       params: tuple[str, ...] = (), body: Schema | None = None,
       body_required: bool = True, description: str = "") -> Schema:
    """One operation. ``roles`` None: no token needed; else 401 and 403 are added.
    ``x-roles`` names the roles that may call it (tests pick their token by it)."""
    responses: dict[str, Schema] = {str(k): v for k, v in ok.items()}
    if roles is not None:
        errors = (*errors, 401, 403)
        description = f"{description}\n\nCaller: {_ROLE_TEXT[roles]}.".strip()
    if body is not None:
        errors = (*errors, 400)
    if any(PARAMETERS[p]["in"] == "path" for p in params):
        errors = (*errors, 404)  # a path parameter out of its pattern matches no route
    for status in sorted(set(errors)):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    out: Schema = {"operationId": op_id, "summary": summary, "tags": [tag],
                   "responses": responses}
    if description:
        out["description"] = description
    if params:
        out["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    if body is not None:
        out["requestBody"] = {"required": body_required,
                              "content": {"application/json": {"schema": body}}}
    if roles is None:
        out["security"] = []
    else:
        out["x-roles"] = list(roles)
    return out


def _act_on_command(verb: str, text: str) -> Schema:
    return op(f"{verb}Command", f"{verb.capitalize()} a command", tag="commands",
              roles=ADMIN, params=("Device", "CommandId"), errors=(404, 409, 422),
              ok={200: _json(ref("Command"), f"the command, {text}")},
              description=f"Takes no body (one is 422). {text.capitalize()}.")


def _limited(paths: dict[str, dict[str, Schema]]) -> dict[str, dict[str, Schema]]:
    """Every /api/ request passes the limits (mdm_server/api/limits.py): a body over the
    route's limit is 413, one that is not JSON 415, a caller over its rate 429, whatever
    the route; and every answer carries API_HEADERS."""
    for path, operations in paths.items():
        if not path.startswith("/api/"):
            continue
        for operation in operations.values():
            responses = operation["responses"]
            for status in (413, 415, 429):
                responses[str(status)] = {
                    "$ref": f"#/components/responses/{ERRORS[status][0]}"}
            for response in responses.values():
                if "$ref" not in response:  # the shared error responses have them
                    response["headers"] = {**response.get("headers", {}), **API_HEADERS}
            operation["responses"] = dict(sorted(responses.items()))
    return paths


# --- the shift report (mdm_server/api/reports.py) ----------------------------------------

_MAYBE_TEXT = {"type": ["string", "null"]}
SCHEMAS.update({
    "ShiftSide": obj({
        "at": TIME,
        "stored": {**BOOLEAN, "description": "false: no record is stored for this event "
                                             "(its policy does not collect check-ins/outs, or "
                                             "it was removed); only the time is known"},
        "user_id": {**_MAYBE_TEXT, "description": "as stored: masked or hashed if the "
                                                  "policy says so"},
        "shift_id": _MAYBE_TEXT,
        "condition": obj({"battery_pct": {"type": ["number", "null"]},
                          "screen": _MAYBE_TEXT, "case": _MAYBE_TEXT, "notes": _MAYBE_TEXT}),
        "not_stored": array(enum(SIDE_FIELDS), description="fields the stored record does "
                            "not hold (the device did not send them, or the policy dropped "
                            "them)"),
        "policy": nullable(STRING), "policy_version": nullable(INTEGER)},
        description="A check-out or check-in as stored."),
    "ShiftChange": obj({"field": enum(CONDITION_FIELDS),
                        "from": {"description": "at check-out, as stored"},
                        "to": {"description": "at check-in, as stored"}},
                       {"delta": {"type": "number", "description": "to - from (battery)"}},
                       description="A condition field stored on both sides that differs."),
    "Shift": obj({
        "device": ID,
        "status": enum(STATUSES, description="closed: checked in; no_check_in: checked out "
                       "again without a check-in; open: out, within the overdue limit; "
                       "overdue: out for longer than it"),
        "user": {**_MAYBE_TEXT, "description": "the check-out's user id as stored"},
        "shift_id": _MAYBE_TEXT,
        "checked_out_at": TIME, "checked_in_at": nullable(TIME),
        "next_check_out_at": {**nullable(TIME), "description": "no_check_in: when the device "
                                                               "was checked out again"},
        "duration_s": {**nullable(COUNT), "description": "closed: out to in; open, overdue: "
                                                         "so far (to `now`); no_check_in: null"},
        "check_out": ref("ShiftSide"), "check_in": nullable(ref("ShiftSide")),
        "changes": array(ref("ShiftChange"))}),
    "ShiftReport": obj({
        "from": TIME, "to": TIME, "now": TIME,
        "overdue_after_s": {**COUNT, "description": "the overdue limit in force"},
        "overdue_source": enum(("tenant", "default")),
        "overdue": nullable(array(ref("Shift"), description=(
            f"devices out past the limit now, longest out first, at most {OVERDUE_MAX}, "
            "whatever the range; on the first page only (null on later pages)"))),
        "overdue_total": nullable(COUNT),
        "shifts": array(ref("Shift"), description="shifts overlapping [from, to), oldest "
                                                  "check-out first"),
        "next": NEXT}),
    "MyShifts": obj({"from": TIME, "to": TIME, "now": TIME, "overdue_after_s": COUNT,
                     "shifts": array(ref("Shift")), "next": NEXT}),
    "ShiftSettings": obj({
        "overdue_after_s": {**COUNT, "description": "the limit in force"},
        "source": enum(("tenant", "default")),
        "setting_s": {**nullable(COUNT), "description": "the tenant's own; null: the default"},
        "longest_shift_s": {**nullable(COUNT), "description": "the longest shift that began "
                                                              "in the last 30 days"},
        "default_s": {**COUNT, "description": "longest_shift_s + 3600 (86400 without one)"},
        "updated_at": nullable(TIME), "updated_by": nullable(STRING)}),
    "ShiftSettingsRequest": obj({"overdue_after_s": {
        "type": ["integer", "null"], "minimum": OVERDUE_MIN_S, "maximum": OVERDUE_MAX_S,
        "description": "seconds; null: back to the default"}}),
})
PARAMETERS.update({
    "ShiftFrom": _param("from", "query", TIME, "shifts that had not ended by then (RFC 3339, "
                        f"with offset; default: `to` - {RANGE_DEFAULT_DAYS} days)"),
    "ShiftTo": _param("to", "query", TIME, "shifts checked out before then (default: now); "
                      f"at most {RANGE_MAX_DAYS} days after `from` (else 400)"),
    "ShiftDevice": _param("device", "query", ID, "only this device"),
    "ShiftUser": _param("user", "query", {"type": "string", "minLength": 1,
                                          "maxLength": USER_MAX, "pattern": "^[^\\u0000]*$"},
                        "only shifts whose check-out stored this user id, exactly as stored "
                        "(a hashed one by its hash)"),
    "ShiftStatus": _param("status", "query", enum(STATUSES), "only shifts in this status"),
    "ShiftFormat": _param("format", "query", enum(("json", "csv")),
                          "csv: the same shifts as CSV (as `Accept: text/csv`)"),
    "ShiftLimit": _param("limit", "query", {"type": "integer", "minimum": 1,
                                            "maximum": CSV_LIMIT_MAX},
                         f"shifts per page: JSON at most {JSON_LIMIT_MAX} (default "
                         f"{LIMIT_DEFAULT}), CSV at most {CSV_LIMIT_MAX} (default "
                         f"{CSV_LIMIT_MAX}); more is 400"),
})


def _shift_paths(v1: str, me: str) -> dict[str, dict[str, Schema]]:
    csv_headers = {
        "X-Next-Cursor": {"required": False, "schema": STRING,
                          "description": "CSV: the `cursor` of the next page (absent on "
                                         "the last)"},
        "X-Shift-Rows": {"required": False, "schema": {"type": "string",
                                                       "pattern": "^[0-9]+$"},
                         "description": "CSV: shifts in this file"},
    }
    report = _json(ref("ShiftReport"), "the report", csv_headers)
    report["content"][CSV_TYPE] = {"schema": {"type": "string",
                                              "contentMediaType": CSV_TYPE}}
    return {
        f"{v1}/reports/shifts": {"get": op(
            "getShiftReport", "Shifts: who had which device, its condition out and back",
            tag="reports", roles=READER,
            params=("ShiftFrom", "ShiftTo", "ShiftDevice", "ShiftUser", "ShiftStatus",
                    "ShiftFormat", "ShiftLimit", "Cursor"), errors=(400,),
            description="Shifts (a check-out and the device's next check-in) overlapping "
                        "[from, to), oldest check-out first, as stored: user ids and "
                        "condition as the device's policy left them. CSV with `Accept: "
                        "text/csv` or `format=csv` (RFC 4180, a header row; a cell starting "
                        "with = + - @ is prefixed with '). With `user`, or `status` closed "
                        f"or no_check_in, at most {SCAN_MAX} check-outs are examined per "
                        "request: a page may hold fewer shifts (even none) and a `next`. "
                        "The first page also lists the devices out past the overdue "
                        "limit. A read of personal data: one entry per "
                        "listed device in its user's access log (`shifts`).",
            ok={200: report})},
        f"{v1}/reports/shifts/settings": {
            "get": op("getShiftSettings", "The tenant's overdue limit", tag="reports",
                      roles=READER, ok={200: _json(ref("ShiftSettings"), "the limit")}),
            "put": op("putShiftSettings", "Set the tenant's overdue limit", tag="reports",
                      roles=ADMIN, errors=(422,), body=ref("ShiftSettingsRequest"),
                      description="Audited (`shift_settings.update`).",
                      ok={200: _json(ref("ShiftSettings"), "the limit now")}),
        },
        f"{me}/shifts": {"get": op(
            "listMyShifts", "My device's shifts", tag="me", roles=USER,
            params=("Device", "ShiftFrom", "ShiftTo", "Limit", "Cursor"), errors=(400, 404),
            description="As the shift report, for this device and its current enrollment.",
            ok={200: _json(ref("MyShifts"), "the shifts")})},
    }


# --- live streams (mdm_server/api/live.py) --------------------------------------------------

PARAMETERS.update({
    "LiveDevice": _param("device", "query", ID, "only this device (not with `group`)"),
    "LiveGroup": _param("group", "query", ID, "only the group's devices as of the stream's "
                        "start (not with `device`)"),
})
LIVE_EVENTS = ("ready", "location", "gap", "end")
MY_LIVE_EVENTS = ("ready", "stored", "watching", "read", "command", "gap", "end")


def _sse(events: tuple[str, ...]) -> Schema:
    """A stream of events (OpenAPI 3.1: ``schema`` describes each event)."""
    return {"description": "a Server-Sent Events stream (`text/event-stream`), open until "
                           "the client closes it; each event's `data` is JSON: docs/api.md, "
                           "\"Live\"",
            "content": {"text/event-stream": {"schema": {
                "type": "object", "required": ["event", "data"],
                "properties": {"event": enum(events),
                               "data": {"type": "string",
                                        "contentMediaType": "application/json"}}}}}}


def _live_paths(v1: str, me: str) -> dict[str, dict[str, Schema]]:
    """``x-stream: sse``: an answer that does not end (the OpenAPI test does not fuzz
    its 200; tests/integration/test_live.py tests it)."""
    return {
        f"{v1}/live": {"get": {**op(
            "watchLive", "Stored locations of the tenant's devices, as they are committed",
            tag="live", roles=ADMIN, params=("LiveDevice", "LiveGroup"),
            errors=(400, 404, 429),
            description="Server-Sent Events: `ready`, then `location` with the last known "
                        "position of each device in scope, then a `location` per committed "
                        "batch with its points exactly as stored (after the policy). Each "
                        "watched device's user sees the watch in their access log (`live`, "
                        "start and end). 404: a device or group that is not the tenant's; "
                        "429: too many streams open for the token or the tenant.",
            ok={200: _sse(LIVE_EVENTS)}), "x-stream": "sse"}},
        f"{me}/live": {"get": {**op(
            "watchMyDevice", "What is happening to my device now", tag="me", roles=USER,
            params=("Device",), errors=(404, 429),
            description="Server-Sent Events: `ready` (who is watching now), `stored` (its "
                        "location was stored), `watching` (an admin started or stopped "
                        "watching its live location), `read` (an admin read its data), "
                        "`command` (a command's progress: lock, wipe, remote view ...).",
            ok={200: _sse(MY_LIVE_EVENTS)}), "x-stream": "sse"}},
    }


def _paths() -> dict[str, dict[str, Schema]]:
    v1 = "/api/v1"
    dev = f"{v1}/devices/{{device}}"
    cmds = f"{dev}/commands"
    me = f"{v1}/me/devices/{{device}}"
    data_params = ("Device", "Kind", "From", "To", "Limit", "Cursor")
    return {
        **_shift_paths(v1, me),
        **_live_paths(v1, me),
        "/healthz": {"get": op(
            "health", "Is the server up (and its ingest)?", tag="meta", roles=None,
            ok={200: _json(ref("Health"), "the database answers")})},
        "/livez": {"get": op(
            "live", "Is the process alive?", tag="meta", roles=None,
            ok={200: _json(ref("Live"), "it answers")})},
        "/readyz": {"get": op(
            "ready", "Ready to serve: database up, every ingest worker on the broker?",
            tag="meta", roles=None, description="docs/operations.md, \"Health probes\".",
            ok={200: _json(ref("Ready"), "the database answers and every ingest worker "
                                         "is connected to the broker"),
                503: _json(ref("NotReady"), "not ready, and why")})},
        PATH: {"get": op(
            "openapi", "This document", tag="meta", roles=None,
            ok={200: _json(ANY_OBJECT, "OpenAPI 3.1")})},
        f"{v1}/token": {"get": op(
            "getToken", "Who this token is: tenant, role, name (and device)", tag="meta",
            roles=ANY_ROLE, description="The pages ask it after sign-in, to show what the "
            "role may do.", ok={200: _json(ref("TokenInfo"), "the token's principal")})},
        f"{v1}/tokens": {"get": op(
            "listTokens", "The tenant's API tokens, newest first", tag="meta",
            roles=READER, params=("TokenState", "Limit", "TokenCursor"), errors=(400,),
            description="Every token of the tenant (admins, auditors, device users), "
                        "working or not; never a token itself.",
            ok={200: _json(page("tokens", ref("Token")), "a page of tokens")})},
        f"{v1}/tokens/{{token_id}}": {"delete": op(
            "revokeToken", "Revoke a token now", tag="meta", roles=ADMIN,
            params=("TokenId",), errors=(404,),
            description="From its next request on the token is refused (401) on every "
                        "route. Audited (`token.revoke`). A token revoked already: 204 "
                        "again; another tenant's: 404.",
            ok={204: {"description": "revoked"}})},
        # Devices, their data, dead letters, erasure requests, the audit log
        f"{v1}/devices": {"get": op(
            "listDevices", "The tenant's devices", tag="devices", roles=READER,
            params=("Limit", "Cursor"), errors=(400,),
            ok={200: _json(page("devices", ref("DeviceSummary")), "a page of devices, "
                           "by id")})},
        dev: {"get": op(
            "getDevice", "A device and its last known state", tag="devices", roles=READER,
            params=("Device",), errors=(404,),
            description="A read of personal data: written to the device user's access log.",
            ok={200: _json(ref("Device"), "the device")})},
        f"{dev}/data": {"get": op(
            "getDeviceData", "A device's records of one kind", tag="devices", roles=READER,
            params=data_params, errors=(400, 404),
            description="`from <= ts < to`, oldest first, exactly as stored. A read of "
                        "personal data: written to the device user's access log.",
            ok={200: _json(page("records", ref("Record")), "a page of records")})},
        f"{dev}/trips": {"get": op(
            "getDeviceTrips", "Trips, stops, place events and days of a device",
            tag="devices", roles=READER,
            params=("Device", "TripsFrom", "TripsTo", "Tz", *(f"Trip_{k}" for k in BOUNDS)),
            errors=(400, 404, 422),
            description="Computed from the stored locations `from <= ts < to` (at most "
                        f"{MAX_RANGE.days} days; more than {MAX_POINTS} points is 422 "
                        "`too_many_points`). Says the precision in force and the points "
                        "the policy suppressed, and never reports movement finer than the "
                        "precision. A read of personal data: written to the device user's "
                        "access log (`trips`).",
            ok={200: _json(ref("Trips"), "the analysis")})},
        f"{v1}/dead-letters": {"get": op(
            "listDeadLetters", "Refused input, counted per device, reason and hour; "
            "newest first", tag="devices", roles=READER,
            params=("Limit", "Cursor"), errors=(400,),
            ok={200: _json(page("dead_letters", ref("DeadLetter")), "never a payload")})},
        f"{v1}/erasure-requests": {"get": op(
            "listErasureRequests", "The tenant's erasure requests", tag="erasure",
            roles=READER, params=("ErasureState", "Limit"), errors=(400,),
            ok={200: _json(listing("erasure_requests", ref("ErasureRequest")),
                           "newest first")})},
        f"{v1}/erasure-requests/{{request_id}}:fulfil": {"post": op(
            "fulfilErasureRequest", "Erase the device's data now", tag="erasure",
            roles=ADMIN, params=("RequestId",), errors=(404, 409, 422),
            description="Takes no body (one is 422). Deletes the device's telemetry, "
                        "check-outs, suppressed counts and dead letters; keeps the fact.",
            ok={200: _json(ref("ErasureRequest"), "the request, fulfilled")})},
        f"{v1}/erasure-requests/{{request_id}}:refuse": {"post": op(
            "refuseErasureRequest", "Refuse an erasure request, with a reason",
            tag="erasure", roles=ADMIN, params=("RequestId",), errors=(404, 409, 422),
            body=obj({"reason": {**TEXT, "minLength": 1, "maxLength": REFUSAL_MAX,
                                 "pattern": "^[^\\u0000]*\\S[^\\u0000]*$"}}),
            ok={200: _json(ref("ErasureRequest"), "the request, refused")})},
        f"{v1}/audit": {"get": op(
            "listAuditEntries", "The tenant's audit log, newest first", tag="audit",
            roles=READER, params=("Limit", "Cursor"), errors=(400,),
            ok={200: _json(page("entries", ref("AuditEntry")), "a page of entries")})},
        # Policies
        f"{v1}/policies": {"get": op(
            "listPolicies", "The policies in force", tag="policies", roles=READER,
            ok={200: _json(ref("PolicyList"), "the policies, the floor, personal devices")})},
        f"{v1}/policies/{{name}}": {
            "get": op("getPolicy", "A policy's newest version", tag="policies",
                      roles=READER, params=("PolicyName",), errors=(404,),
                      ok={200: _json(ref("PolicyVersion"), "with body and explanation")}),
            "put": op("putPolicy", "Create or change a policy (a new version)",
                      tag="policies", roles=ADMIN, params=("PolicyName",),
                      errors=(409, 422), body=ref("Policy"),
                      description="`name` may be left out (the URL gives it). The devices "
                                  "are told in the same transaction. The tenant's stored "
                                  "versions are capped in bytes: the bodies of the oldest "
                                  "versions that are not in force are pruned to make room; "
                                  "409 `policy_storage_full` when the policies in force and "
                                  "this one do not fit (nothing is changed).",
                      ok={200: _json(ref("PolicyVersion"), "a new version"),
                          201: _json(ref("PolicyVersion"), "the first version")}),
            "delete": op("deletePolicy", "Delete a policy (a deletion version)",
                         tag="policies", roles=ADMIN, params=("PolicyName",),
                         errors=(404, 409),
                         description="The default policy cannot be deleted (409).",
                         ok={204: {"description": "deleted"}}),
        },
        f"{v1}/policies/{{name}}/versions": {"get": op(
            "listPolicyVersions", "A policy's versions, oldest first, without bodies",
            tag="policies", roles=READER, params=("PolicyName", "Limit", "Cursor"),
            errors=(400, 404),
            ok={200: _json(page("versions", ref("PolicyVersion")),
                           "a page of versions, without their bodies")})},
        f"{v1}/policies/{{name}}/versions/{{version}}": {"get": op(
            "getPolicyVersion", "One version of a policy, with its body", tag="policies",
            roles=READER, params=("PolicyName", "PolicyVersionNumber"), errors=(404,),
            ok={200: _json(ref("PolicyVersion"), "with its policy, explanation and "
                           "warnings (none for a deletion or a pruned version)")})},
        f"{v1}/policies/{{name}}:preview": {"post": op(
            "previewPolicy", "What a policy would store of a sample payload",
            tag="policies", roles=ADMIN, params=("PolicyName",), errors=(404, 422),
            body=ref("PreviewRequest"),
            description="Nothing is written but an audit entry. Hashes use a throwaway "
                        "key; previews are rate-limited per tenant (429).",
            ok={200: _json(ref("Preview"), "what would be stored")})},
        # Named places
        f"{v1}/places": {"get": op(
            "listPlaces", "The places in force, by name", tag="places", roles=READER,
            params=("Limit", "Cursor"), errors=(400,),
            ok={200: _json(ref("PlaceList"), "a page of places")})},
        f"{v1}/places/{{place}}": {
            "get": op("getPlace", "A place's newest version", tag="places", roles=READER,
                      params=("Place",), errors=(404,),
                      ok={200: _json(ref("PlaceVersion"), "with its area")}),
            "put": op("putPlace", "Create or change a place (a new version)", tag="places",
                      roles=ADMIN, params=("Place",), errors=(409, 422), body=ref("Zone"),
                      description="A GeoJSON Polygon or MultiPolygon, or a Feature of one, "
                                  "validated as policy zones are. Old versions' bodies are "
                                  "pruned to keep the tenant under its cap; 409 "
                                  "`place_storage_full` when even so it does not fit.",
                      ok={200: _json(ref("PlaceVersion"), "a new version"),
                          201: _json(ref("PlaceVersion"), "the first version")}),
            "delete": op("deletePlace", "Delete a place (a deletion version)", tag="places",
                         roles=ADMIN, params=("Place",), errors=(404,),
                         ok={204: {"description": "deleted"}}),
        },
        f"{v1}/places/{{place}}/versions": {"get": op(
            "listPlaceVersions", "A place's versions, oldest first, without bodies",
            tag="places", roles=READER, params=("Place", "Limit", "Cursor"),
            errors=(400, 404),
            ok={200: _json(page("versions", ref("PlaceVersion")), "a page of versions")})},
        f"{v1}/places/{{place}}/versions/{{version}}": {"get": op(
            "getPlaceVersion", "One version of a place, with its body", tag="places",
            roles=READER, params=("Place", "PolicyVersionNumber"), errors=(404,),
            ok={200: _json(ref("PlaceVersion"), "with its area (none for a deletion or a "
                           "pruned version)")})},
        # Commands (docs/commands.md)
        cmds: {
            "post": op("createCommand", "Send a command to a device", tag="commands",
                       roles=ADMIN, params=("Device", "IdempotencyKey"),
                       errors=(404, 409, 422), body=ref("CommandRequest"),
                       description="A factory reset waits in pending_approval for a second "
                                   "admin. Guards: device_revoked (409), personal_device "
                                   "(403).",
                       ok={201: _json(ref("Command"), "created", _LOCATION),
                           200: _json(ref("Command"), "the first answer to this "
                                      "Idempotency-Key", _LOCATION)}),
            "get": op("listDeviceCommands", "A device's commands, newest first",
                      tag="commands", roles=READER, params=("Device", "CommandState", "Limit"),
                      errors=(400, 404),
                      ok={200: _json(listing("commands", ref("Command")), "commands")}),
        },
        f"{cmds}/{{command_id}}": {"get": op(
            "getCommand", "A command with every event of its life", tag="commands",
            roles=READER, params=("Device", "CommandId"), errors=(404,),
            ok={200: _json(ref("CommandWithEvents"), "the command")})},
        f"{cmds}/{{command_id}}:approve": {"post": _act_on_command(
            "approve", "approved by a second admin (the requester's own approval is 403 "
                       "same_admin; a revoked device's, 409 device_revoked)")},
        f"{cmds}/{{command_id}}:cancel": {"post": _act_on_command(
            "cancel", "cancelled if it has not gone to the broker yet (else 409 "
                      "not_cancellable)")},
        f"{dev}/notices": {"get": op(
            "listDeviceNotices", "The device's user-notice log", tag="commands",
            roles=READER, params=("Device", "Limit"), errors=(400, 404),
            ok={200: _json(listing("notices", ref("NoticeLogEntry")), "newest first")})},
        f"{v1}/commands": {"get": op(
            "listCommands", "The tenant's commands, e.g. the approval queue",
            tag="commands", roles=READER, params=("CommandState", "Limit"), errors=(400,),
            ok={200: _json(listing("commands", ref("Command")), "newest first")})},
        f"{v1}/groups/{{group}}/commands": {"post": op(
            "createGroupCommand", "Send a command to every enrolled device of a group",
            tag="commands", roles=ADMIN, params=("Group", "IdempotencyKey"),
            errors=(404, 422), body=ref("CommandRequest"),
            description="No factory reset (403 group_factory_reset); a full wipe skips "
                        "personal devices (listed in `refused`); 404 empty_group.",
            ok={201: _json(ref("CommandBatch"), "created", _LOCATION),
                200: _json(ref("CommandBatch"), "the first answer to this "
                           "Idempotency-Key", _LOCATION)})},
        f"{v1}/command-batches/{{batch_id}}": {"get": op(
            "getCommandBatch", "A group request's progress", tag="commands",
            roles=READER, params=("BatchId",), errors=(404,),
            ok={200: _json(ref("CommandBatch"), "the batch")})},
        f"{v1}/notice-templates/{{kind}}": {
            "get": op("getNoticeTemplate", "The notice a kind of command carries by default",
                      tag="commands", roles=READER, params=("NoticeKind",), errors=(404,),
                      ok={200: _json(ref("NoticeTemplate"), "the tenant's, else built in")}),
            "put": op("putNoticeTemplate", "Set the tenant's notice for a kind of command",
                      tag="commands", roles=ADMIN, params=("NoticeKind",), errors=(404, 422),
                      body=ref("NoticeTemplateRequest"),
                      ok={200: _json(ref("NoticeTemplate"), "the tenant's template")}),
        },
        # The device user's own devices
        f"{v1}/me/devices": {"get": op(
            "listMyDevices", "My devices", tag="me", roles=USER,
            ok={200: _json(listing("devices", ref("MyDevice")), "the devices the token "
                           "covers")})},
        me: {"get": op(
            "getMyDevice", "What is held about my device, at a glance", tag="me",
            roles=USER, params=("Device",), errors=(404,),
            description="Records per kind and the newest record of each, received since "
                        "the enrollment the token covers began. Not access-logged: it is "
                        "the user's own read.",
            ok={200: _json(ref("MyDeviceSummary"), "the summary")})},
        f"{me}/data": {"get": op(
            "getMyDeviceData", "My device's records of one kind", tag="me", roles=USER,
            params=data_params, errors=(400, 404),
            ok={200: _json(page("records", ref("Record")), "a page of records")})},
        f"{me}/policy": {"get": op(
            "getMyPolicy", "The policy in force, in plain words", tag="me", roles=USER,
            params=("Device",), errors=(404,),
            ok={200: _json(ref("PolicyInForce"), "the policy")})},
        f"{me}/notices": {"get": op(
            "listMyNotices", "Every command that affected me, with its notice", tag="me",
            roles=USER, params=("Device", "Limit"), errors=(400, 404),
            ok={200: _json(listing("notices", ref("NoticeLogEntry")), "newest first")})},
        f"{me}/access-log": {"get": op(
            "getMyAccessLog", "Who in an admin role read my device's personal data",
            tag="me", roles=USER, params=("Device", "Limit"), errors=(400, 404),
            ok={200: _json(listing("entries", ref("AccessLogEntry")), "newest first")})},
        f"{me}/export/summary": {"get": op(
            "getMyExportSummary", "What an export will hold", tag="me", roles=USER,
            params=("Device",), errors=(404,),
            ok={200: _json(ref("ExportSummary"), "records per kind")})},
        f"{me}/export": {"get": op(
            "exportMyDevice", "Everything held about my device, as one ZIP", tag="me",
            roles=USER, params=("Device",), errors=(404, 429),
            description="Streamed: device.json, notices.json, access-log.json, policy.json "
                        "and per kind telemetry/{kind}.jsonl and .csv. One running export "
                        "per user (429).",
            ok={200: {"description": "the ZIP",
                      "headers": {"X-Export-Records": {
                          "required": True, "schema": {"type": "string",
                                                       "pattern": "^[0-9]+$"},
                          "description": "records in the export"}},
                      "content": {"application/zip": {
                          "schema": {"type": "string", "contentMediaType": "application/zip"}
                      }}}})},
        f"{me}/erasure-requests": {
            "post": op("requestErasure", "Ask for my device's data to be erased", tag="me",
                       roles=USER, params=("Device",), errors=(404, 409, 422),
                       body=obj({}), body_required=False,
                       description="No body, or an empty object: any field is 422. Fulfilled "
                                   "automatically at `due_at` (30 days) unless an admin "
                                   "acted; 409 while one is pending.",
                       ok={201: _json(ref("ErasureRequest"), "the request, pending")}),
            "get": op("listMyErasureRequests", "My erasure requests", tag="me", roles=USER,
                      params=("Device",), errors=(404,),
                      ok={200: _json(listing("erasure_requests", ref("ErasureRequest")),
                                     "newest first")}),
        },
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; treat it as read-only)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MDM telemetry backend",
            "version": "1",
            "description": (
                "Every request under /api/v1 carries `Authorization: Bearer <token>`. A "
                "token has a tenant and a role: `admin` (everything of its tenant), "
                "`auditor` (every GET an admin may), `user` (only /api/v1/me, for the "
                "devices it is bound to). Anything outside the caller's reach is 404; a "
                "route of another role is 403. Errors are JSON `{\"error\"}` plus, where "
                "useful, `code` and `issues`; no error quotes a value from the request. "
                f"Lists take `limit` (default 100, at most {LIST_LIMIT_MAX}) and a `cursor` "
                "from the previous page's `next`. A body is JSON (`Content-Type: "
                "application/json`, else 415) within its route's limit (413); requests are "
                "rate-limited per token, and per client address without a valid one (429). "
                "Every answer is `Cache-Control: no-store`, `X-Content-Type-Options: "
                "nosniff`. Contract: docs/api.md, docs/commands.md, docs/policies.md."),
        },
        "tags": [{"name": n} for n in
                 ("devices", "erasure", "audit", "policies", "places", "commands", "reports",
                  "live", "me", "meta")],
        "security": [{"bearerAuth": []}],
        "paths": _limited(_paths()),
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": {name: resp for name, resp in ERRORS.values()},
        },
    }


@cache
def _body() -> bytes:
    return orjson.dumps(document())


@public
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_body(), content_type="application/json")


def routes() -> list[web.RouteDef]:
    return [web.get(PATH, openapi_json)]
