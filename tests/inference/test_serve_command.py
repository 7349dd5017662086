"""`gptjax serve` as a process: it refuses a bad command line with exit 2, and SIGTERM lets the stream in
flight finish before the process exits (uvicorn's graceful shutdown, then SIGTERM's own exit status)."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT


def test_no_checkpoint_exits_2():
    from gptjax.inference.serve.__main__ import main

    with pytest.raises(SystemExit) as e:
        main([], as_script=False)
    assert e.value.code == 2


@pytest.mark.slow
def test_sigterm_finishes_the_stream_in_flight(tmp_path):
    pytest.importorskip("transformers")
    from builders import make_hf

    make_hf(tmp_path / "hf", n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", f"hf:{tmp_path / 'hf'}", f"--port={port}",
                             "--slots=2"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "hi", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "' in rest[-2]
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()

