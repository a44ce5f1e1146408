"""deploy/grafana/mdm.json is a dashboard Grafana can import: valid JSON, every
panel with a Prometheus query of this server's metrics and no personal label.
(That each metric it names is exposed: tests/integration/test_ops.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_dashboard_queries_only_this_servers_metrics() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "mdm.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert re.search(r"\bmdm_[a-z_]+", target["expr"]), target
            # Grouped by bounded labels only.
            for group in re.findall(r"by \(([^)]*)\)", target["expr"]):
                assert set(map(str.strip, group.split(","))) <= {
                    "le", "reason", "type", "state", "route", "status", "method", "result"}
