"""A stand-in for the Hugging Face Hub's API on 127.0.0.1: it answers ``HfApi.dataset_info`` (the commit a dataset
revision names) from ``commits``, and 404 for anything else, with the Hub's error codes for a dataset it does not have
and for a revision a dataset does not have; 503 to everything while ``down``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest


class FakeHub:
    def __init__(self):
        self.commits: dict[str, dict[str, str]] = {}  # dataset -> revision ("main" for none) -> commit
        self.requests: list[str] = []  # the dataset_info requests made
        self.down = False  # answer 503 (a server error, not an answer about the dataset)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                prefix = "/api/datasets/"
                path = unquote(self.path.split("?")[0])
                commit, error = None, "RepoNotFound"
                if path.startswith(prefix):  # huggingface_hub also asks for other things (/api/agent-harnesses)
                    hub.requests.append(path)
                    repo, _, revision = path.removeprefix(prefix).partition("/revision/")
                    commit = hub.commits.get(repo, {}).get(revision or "main")
                    error = "RevisionNotFound" if repo in hub.commits else error
                status, body = (200, {"id": repo, "sha": commit}) if commit else (404, {"error": error})
                if hub.down:
                    status, body, error = 503, {"error": "Service Unavailable"}, None
                data = json.dumps(body).encode()
                self.send_response(status)
                if status == 404:
                    self.send_header("X-Error-Code", error)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at a ``FakeHub`` (online for this test only), with an empty cache of its own."""
    from huggingface_hub import constants

    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield hub
    hub.close()
