"""The golden runs: tiny seeded runs of each task and of reflection reproduce their recorded numbers exactly."""
import json

import pytest

from golden_runs import GOLDEN, RUNS, run, scripted
from conftest import ChatServer


@pytest.fixture(scope="module")
def scripted_server():
    server = ChatServer(scripted)
    yield server
    server.close()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_reproduces_its_recorded_numbers(tmp_path, scripted_server, name):
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    got = run(name, tmp_path, scripted_server.url)
    assert got["stages"] == expected["stages"], "weights, scores or proposals changed: see tests/golden_runs.py"
    assert got["metrics"] == expected["metrics"], "training losses changed: see tests/golden_runs.py"
    assert (got["parse_ok"], got["parse_total"]) == (expected["parse_ok"], expected["parse_total"])
