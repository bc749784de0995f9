"""Start the real app (`python app.py`) in a subprocess on a free loopback port, as the browser, API, Space and
load tests need it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(env: Mapping[str, str], log_path: Path, cwd: Path = ROOT, start_s: float = 90.0) -> Iterator[str]:
    """Run app.py from `cwd` with `env` (plus a free GRADIO_SERVER_PORT on 127.0.0.1); yield its URL once it
    answers; stop it afterwards."""
    port = free_port()
    env = {**env, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + start_s
        try:
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if process.poll() is not None:
                        raise RuntimeError(f"the app exited: {log_path.read_text()[-3000:]}") from None
                    if time.time() > deadline:
                        raise RuntimeError(f"the app did not start within {start_s:g} s") from None
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
