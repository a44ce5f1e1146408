"""docker-compose.yml runs migrations as PostgreSQL's superuser and the server as its
own restricted role, as scripts/run does (docs/architecture.md, "Audit log and the
server's database role")."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.unit.test_compose import REPO, _compose


def _services() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def test_the_server_runs_as_the_role_migrate_makes_not_as_the_superuser() -> None:
    services = _services()
    superuser = services["postgres"]["environment"]["POSTGRES_USER"]
    migrate, server = services["migrate"], services["server"]
    assert urlsplit(migrate["environment"]["MDM_DATABASE_URL"]).username == superuser
    role = urlsplit(server["environment"]["MDM_DATABASE_URL"]).username
    assert role != superuser
    assert migrate["command"] == ["mdm-server", "migrate", "--server-role", role]
    # The password the role gets is the one the server logs in with.
    assert urlsplit(server["environment"]["MDM_DATABASE_URL"]).password == \
        migrate["environment"]["MDM_SERVER_DB_PASSWORD"]
    assert server["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    # The image's CMD serves and does nothing else (no migration as the server's role).
    assert "command" not in server
    cmd = [line for line in (REPO / "Dockerfile").read_text().splitlines()
           if line.startswith("CMD ")]
    assert cmd == ['CMD ["mdm-server", "serve"]']
