"""`flashmoe serve` as a real process for the tests: one helper for starting it on a free loopback
port, waiting until it answers, and stopping it."""
import contextlib
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(*args, startup_timeout=90, stdout=subprocess.DEVNULL):
    """Yields (process, url) of `flashmoe serve ARGS --host 127.0.0.1 --port FREE` once /health
    answers 200; the process is stopped on exit (its stderr is in process.stderr)."""
    import httpx
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "pyflashmoe", "serve", *args, "--host", "127.0.0.1",
                          "--port", str(port)], env=env, cwd=ROOT, stdout=stdout,
                         stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert p.poll() is None, p.communicate()[1][-2000:]
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        yield p, url
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
