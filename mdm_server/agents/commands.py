"""Commands in a foreign agent's own form.

OwnTracks takes ``{"_type": "cmd", "action": "reportLocation"}`` on
``owntracks/{user}/{device}/cmd`` (MQTT) or in the answer to its next post
(HTTP), and answers with a location whose trigger ``t`` is ``r``: that
location completes the ``locate`` (mdm_server/agents/ingest.py). Nothing is
signed: the apps verify nothing, which is one reason they are offered ``locate``
only (mdm_server/agents/__init__.py).
"""

from __future__ import annotations

from typing import Any

from mdm_server.agents.setup import owntracks_topic_base

__all__ = ["owntracks_cmd_topic", "owntracks_form"]


def owntracks_form(command_type: str) -> dict[str, Any]:
    """The app's form of a command (ValueError for one it cannot carry out)."""
    if command_type == "locate":
        return {"_type": "cmd", "action": "reportLocation"}
    raise ValueError(f"OwnTracks cannot carry out a {command_type} command")


def owntracks_cmd_topic(username: str, device: str) -> str:
    return owntracks_topic_base(username, device) + "/cmd"
