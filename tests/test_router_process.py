"""The router as a process: flags and env, auth, JSON logs, refusal, SIGTERM drain, shard failure."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import pytest
from servers import http_ok, router_process, shard_healthy, start_router, start_shard, stop_process, wait_for

from ember.router.metrics import without_model


@pytest.fixture(scope="module")
def shard(tiny_llama_dir, tmp_path_factory):
    proc, socket = start_shard(tiny_llama_dir, str(tmp_path_factory.mktemp("router-proc") / "s"))
    try:
        wait_for(lambda: shard_healthy(socket), 120, "shard", proc)
        yield proc, socket
    finally:
        stop_process(proc)


def test_refuses_inconsistent_limits(shard, tiny_llama_dir):
    _, socket = shard
    proc, _ = start_router(
        socket, tiny_llama_dir, "--max-input-tokens", "600", "--max-total-tokens", "500", stderr=subprocess.PIPE
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert b"`max_input_tokens` must be < `max_total_tokens`" in err


def test_api_key_cors_env_and_json_logs(shard, tiny_llama_dir, tmp_path):
    _, socket = shard
    log = tmp_path / "router.log"
    with router_process(
        socket,
        tiny_llama_dir,
        "--api-key",
        "s3cret",
        "--json-output",
        "--cors-allow-origin",
        "https://app.example",
        capture=log,
        env={"MAX_CONCURRENT_REQUESTS": "7"},
    ) as url:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        denied = httpx.post(url + "/generate", json=body)
        assert denied.status_code == 401 and denied.content == b""
        assert httpx.post(url + "/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(
            url + "/generate",
            json=body,
            headers={"authorization": "bearer S3CRET", "x-request-id": "json-1"},
            timeout=60,
        )
        assert ok.status_code == 200
        info = httpx.get(url + "/info")  # not behind the key
        assert info.json()["max_concurrent_requests"] == 7
        pre = httpx.options(
            url + "/generate", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    done = next(line for line in lines if line.get("id") == "json-1")
    assert done["message"].startswith("Success") and done["generated_tokens"] == 2 and done["input_tokens"] == 1


def test_sigterm_drains_in_flight_requests(shard, tiny_llama_dir):
    """SIGTERM: not ready at once (health 503), new requests refused with 503 so a load balancer can send
    them elsewhere, the one in flight finished, and the exit as soon as it ends, with idle keep-alive
    connections open: not after the grace period (ten minutes here)."""
    _, socket = shard
    proc, url = start_router(socket, tiny_llama_dir, "--graceful-shutdown-timeout", "600")
    try:
        wait_for(lambda: http_ok(url + "/health"), 60, "router", proc)
        result = {}
        idle = httpx.Client(timeout=10)  # a keep-alive connection left open, as a proxy's pool keeps them
        assert idle.get(url + "/info").status_code == 200
        with httpx.Client(timeout=60) as client:
            body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 300, "ignore_eos": True}}
            with client.stream("POST", url + "/generate_stream", json=body) as stream:
                events = (json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:"))
                first = next(events)
                proc.send_signal(signal.SIGTERM)
                wait_for(lambda: httpx.get(url + "/health").status_code == 503, 30, "not ready")
                health = httpx.get(url + "/health")
                assert health.json()["error_type"] == "draining"
                refused = httpx.post(url + "/generate", json={"inputs": "Hi"}, timeout=10)
                assert refused.status_code == 503 and refused.json()["error_type"] == "draining"
                assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"
                chat = httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=10)
                assert chat.status_code == 503 and chat.json()["error"]["type"] == "draining"
                text = without_model(httpx.get(url + "/metrics").text)
                assert "\nember_draining 1\n" in text
                assert 'ember_http_requests_total{route="/generate",status="503"} 1' in text
                assert 'ember_http_requests_total{route="/v1/chat/completions",status="503"} 1' in text
                result["events"] = [first, *events]
        idle.close()
        assert result["events"][-1]["details"]["generated_tokens"] == 300
        assert len(result["events"]) == 300
        assert proc.wait(60) == 0
    finally:
        stop_process(proc)


def test_shard_failure_is_424_and_unhealthy(shard, tiny_llama_dir):
    shard_proc, socket = shard
    with router_process(socket, tiny_llama_dir) as url:
        with httpx.stream(
            "POST",
            url + "/generate_stream",
            timeout=60,
            json={"inputs": "Hello world", "parameters": {"max_new_tokens": 500}},
        ) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert "token" in json.loads(first[5:])
            shard_proc.kill()
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert events[-1]["error_type"] == "generation"
        assert events[-1]["error"].startswith("Request failed during generation: ")
        r = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=30)
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and health.json() == {"error": "unhealthy", "error_type": "healthcheck"}
        assert httpx.get(url + "/info").status_code == 200  # the router stays up
