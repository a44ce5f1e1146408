"""Collection and masking policies applied before anything is stored.

Pure: no I/O. The policy model and compiler arrive with the policy issue; until
then the ingest core stores records as the wire contract delivers them (unknown
fields already dropped by ``agent_protocol``).
"""

__all__: list[str] = []
