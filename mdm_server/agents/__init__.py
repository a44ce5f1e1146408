"""Location agents people already run, besides our own (issue 12): which agents a
device may be enrolled for, what each can carry out, and how it logs in.

- ``native``: docs/protocol.md (MQTT, signed commands, every command type);
- ``owntracks``: the OwnTracks apps, over MQTT (the device's own broker account,
  topics ``owntracks/{username}/{device}/...``) or HTTP (``POST /owntracks`` with
  the same credentials); only ``locate`` (OwnTracks' ``reportLocation``);
- ``osmand`` / ``traccar``: the OsmAnd app and Traccar Client, HTTP only
  (``/osmand/{key}``: the URL key authenticates); no commands at all. They differ
  in the unit of ``speed`` (OsmAnd m/s, Traccar Client knots).

The adapters that read their messages are pure (agent_protocol.owntracks,
agent_protocol.osmand); docs/agents.md has the mapping and the apps' settings.
"""

from __future__ import annotations

from typing import Final, Literal

from agent_protocol import COMMAND_TYPES

__all__ = [
    "AGENTS",
    "COMMANDS_BY_AGENT",
    "FOREIGN_AGENTS",
    "SPEED_UNITS",
    "URL_KEY_AGENTS",
    "Agent",
    "agent_supports",
    "unsupported_text",
]

Agent = Literal["native", "owntracks", "osmand", "traccar"]
AGENTS: Final[tuple[str, ...]] = ("native", "owntracks", "osmand", "traccar")
FOREIGN_AGENTS: Final = frozenset({"owntracks", "osmand", "traccar"})
#: Agents that authenticate by a secret key in the URL they post to (they send
#: nothing else); they get no broker account.
URL_KEY_AGENTS: Final = frozenset({"osmand", "traccar"})
#: The unit of ``speed`` in their query and form requests (agent_protocol.osmand).
SPEED_UNITS: Final[dict[str, Literal["knots", "mps"]]] = {"osmand": "mps",
                                                          "traccar": "knots"}

#: Command types each agent can carry out; any other is refused at the API (409
#: ``unsupported_by_agent``) rather than queued for a device that never acts on it.
COMMANDS_BY_AGENT: Final[dict[str, frozenset[str]]] = {
    "native": frozenset(COMMAND_TYPES),
    "owntracks": frozenset({"locate"}),  # reportLocation
    "osmand": frozenset(),
    "traccar": frozenset(),
}

_NAMES: Final = {"native": "our own agent", "owntracks": "OwnTracks",
                 "osmand": "the OsmAnd app", "traccar": "Traccar Client"}


def agent_supports(agent: str, command_type: str) -> bool:
    return command_type in COMMANDS_BY_AGENT.get(agent, frozenset())


def unsupported_text(agent: str, command_type: str) -> str:
    """Why a command is refused, for people (names the agent and the type only)."""
    can = sorted(COMMANDS_BY_AGENT.get(agent, frozenset()))
    return (f"the device reports with {_NAMES.get(agent, agent)}, which cannot carry out "
            f"a {command_type} command (it can: {', '.join(can) if can else 'none'})")
