"""`biomedgpt serve MODEL_DIR` as users run it: the command starts its own Ray on 127.0.0.1 in Serve's
throughput-optimised mode (`serve.spec.SERVE_RAY_ENV`), answers over HTTP, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests_paths import REPO


def test_serve_command_answers_in_throughput_mode_and_stops_on_ctrl_c(vqa_model_dir, tmp_path):
    from PIL import Image

    from biomedgpt.demo import wait_healthy
    from biomedgpt.session import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED")}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "biomedgpt.cli", "serve", str(vqa_model_dir), "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=240)
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 40, 200)).save(buf, "PNG")
        body = json.dumps({"question": "is there a fracture?", "image": base64.b64encode(buf.getvalue()).decode()})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/vqa", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert resp.status == 200 and answer["answer"] and answer["version"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.seek(0)
        output = log.read()
        log.close()
    assert f"at http://127.0.0.1:{port}" in output
    # Serve's controller announces the mode the command put into Ray's environment; its log is not on the
    # console but in the logs folder the command named (Ray's session logs copied there on Ctrl-C)
    assert "Throughput optimized Ray Serve enabled" not in output
    logs = Path(output.split("own logs go to ", 1)[1].split(" (--verbose", 1)[0])
    assert any("Throughput optimized Ray Serve enabled" in f.read_text(errors="replace")
               for f in logs.rglob("*") if f.is_file()), sorted(str(f) for f in logs.rglob("*"))[:50]
