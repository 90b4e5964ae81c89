"""``globalcom2 serve`` (issue 24): vLLM's OpenAI-compatible server with GlobalCom2 on, started on a
tiny local checkpoint and asked over HTTP on localhost: a chat completion with an image answers,
and a request's own ratio (``mm_processor_kwargs`` in the body) changes its prompt length as the
fixed count says. Skipped where vLLM is not installed."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

import globalcom2  # noqa: E402
from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from vllm_reference import make_image  # noqa: E402

# A plain chat template for the tiny tokenizer (it has none): LLaVA-1.6-vicuna's form.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>\n{% endif %}{% endfor %}"
    "{% endif %}{% endfor %} ASSISTANT:"
)
STARTUP_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    path, model, _ = checkpoints.save_tiny("llava_next", folder / "ckpt")
    template = folder / "template.jinja"
    template.write_text(TEMPLATE)
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [
        sys.executable, "-m", "globalcom2", "serve", "--model", str(path), "--retention-ratio", "0.25",
        "--layout", "spatial", "--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "4096", "--enforce-eager", "--chat-template", str(template),
        "--chat-template-content-format", "openai", "--served-model-name", "tiny",
    ]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"globalcom2 serve exited ({proc.returncode}): {(folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"globalcom2 serve did not answer in {STARTUP_S} s: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield base, model
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _chat(base: str, image, **extra) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in it?"},
        ]}],
        "max_tokens": 4, "temperature": 0, **extra,
    }
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None


def test_chat_completion_with_an_image_and_a_per_request_ratio(server):
    base, model = server
    h, w = 500, 700
    image = make_image(h, w, 1)
    default = _chat(base, image)
    low = _chat(base, image, mm_processor_kwargs={"retention_ratio": 0.1})
    for answer in (default, low):
        assert answer["choices"][0]["message"]["content"] is not None
        assert answer["usage"]["completion_tokens"] >= 1
    counts = {r: globalcom2.visual_token_counts(model, (h, w), retention_ratio=r, layout="spatial", count="fixed")[0] for r in (0.25, 0.1)}
    # the same text around the image: the prompts differ by exactly the two fixed counts
    assert default["usage"]["prompt_tokens"] - low["usage"]["prompt_tokens"] == counts[0.25] - counts[0.1]
