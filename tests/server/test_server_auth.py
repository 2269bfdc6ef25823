"""API keys (401 without the right Bearer token, /health open), the loopback-only rule without a key, and the
`sedac-chat serve` command end to end (a real process on a free port)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model, make_tokenizer
from sedac_core.errors import ConfigError
from sedac_core.server import check_listen_address, create_app, is_loopback
from sedac_tui.cli import app as cli_app

from .helpers import running

KEY = "sk-test-sedac"


@pytest.fixture(scope="module")
def auth_url(engine):
    with running(create_app(engine, api_key=KEY)) as url:
        yield url


def test_right_key_is_served(auth_url):
    client = openai.OpenAI(base_url=f"{auth_url}/v1", api_key=KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{auth_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200


def test_wrong_key_with_the_openai_client(auth_url):
    client = openai.OpenAI(base_url=f"{auth_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                          ("POST", "/v1/completions"), ("GET", "/metrics")])
def test_missing_or_wrong_key_is_401(auth_url, headers, method, path):
    r = httpx.request(method, f"{auth_url}{path}", headers=headers, json={"bad": "body"}, timeout=10)
    assert r.status_code == 401  # before the body is even validated
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"


def test_health_needs_no_key(auth_url):
    assert httpx.get(f"{auth_url}/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_key(host):
    assert is_loopback(host)
    check_listen_address(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_other_hosts_need_a_key(host):
    with pytest.raises(ConfigError, match="not a loopback address"):
        check_listen_address(host, None)
    check_listen_address(host, KEY)


def test_cli_refuses_a_public_host_without_a_key(monkeypatch):
    monkeypatch.delenv("SEDAC_API_KEY", raising=False)
    r = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--model", "/no/such/model"])
    assert r.exit_code == 2
    assert "not a loopback address" in r.output and "--api-key or SEDAC_API_KEY" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_serve_end_to_end(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama", seed=3).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SEDAC_API_KEY=KEY, XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.Popen([sys.executable, "-m", "sedac_tui.cli", "serve", "--model", str(model_dir), "--local",
                             "--port", "0", "--queue-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 60
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving "):
                url = line.split(" at ", 1)[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]  # the socket listens before uvicorn starts
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
