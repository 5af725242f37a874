"""scripts/hostile_requests.py against the shared live server: no request gets a 5xx, every case
gets a status it allows, the engine still serves afterwards, and /metrics counted every response."""
import importlib.util
import sys
from pathlib import Path

from srv_helpers import MODEL

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hostile_requests.py"


def load_script():
    spec = importlib.util.spec_from_file_location("hostile_requests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def requests_counted(srv) -> float:
    text = srv.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("moe_rt_requests_total{"))


def test_hostile_requests_get_no_5xx_and_are_all_counted(srv):
    hostile = load_script()
    before = requests_counted(srv)  # this scrape is counted after its own body was rendered
    report = hostile.run(srv.url, MODEL, max_body_bytes=65536)
    after = requests_counted(srv)
    table = hostile.table(report)
    assert len(report.results) >= 60
    assert report.server_errors == [], table
    assert report.unexpected == [], table
    assert report.no_response == [], table
    assert report.alive, table
    assert report.ok
    assert after - before == report.requests_sent + 1
    kinds = {r.case.path.split("?")[0] for r in report.results}
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", f"/v1/models/{MODEL}", "/tokenize",
                 "/detokenize", "/version", "/health", "/metrics", "/v1/moe/stats", "/v2/whatever"):
        assert path in kinds, path


def test_script_main_exits_0_on_a_healthy_server(srv, capsys):
    hostile = load_script()
    assert hostile.main([srv.url, "--max-body-bytes", "65536", "--json"]) == 0
    assert '"server_errors": []' in capsys.readouterr().out
