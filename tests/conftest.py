"""Shared test helpers: the repository root on sys.path, a local OpenAI-compatible chat server, and a TORCH_HOME with
NIQE's model for pyiqa offline."""
import json
import re
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The tests import lossagent.py and the packages from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ChatServer:
    """A tiny OpenAI-compatible server on 127.0.0.1: answers with `reply(body)`, or fails `fail` times first."""

    def __init__(self, reply, fail=0, status=500):
        self.requests, self.fail = [], fail
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                if server.fail > 0:
                    server.fail -= 1
                    self.send_response(status)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply(body)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def scripted_reply(body):
    """A deterministic 'LLM': the proposal depends on how many stages the prompt's history shows."""
    stages = len(re.findall(r"^Stage \d+ \(", body["messages"][1]["content"], re.M))
    return f"Sure.\nWeights: L1:SSIM:GAN={1 - 0.1 * stages:.2f}:{0.1 + 0.05 * stages:.2f}:0.02\nThoughts: scripted."


@pytest.fixture
def server():
    s = ChatServer(scripted_reply)
    yield s
    s.close()


NIQE_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "niqe_modelparameters.mat"


@pytest.fixture
def niqe_torch_home(tmp_path):
    """A TORCH_HOME where pyiqa finds NIQE's model (copied from the shared data beside the checkout), so that NIQE
    runs offline; the test is skipped when that file is not there."""
    if not NIQE_FILE.exists():
        pytest.skip(f"{NIQE_FILE} (NIQE's model, needed offline) is not there")
    home = tmp_path / "torch"
    (home / "hub" / "pyiqa").mkdir(parents=True)
    shutil.copy(NIQE_FILE, home / "hub" / "pyiqa")
    return home
