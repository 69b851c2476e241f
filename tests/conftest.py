import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """The CLI end to end, shared by the CLI, example and server-overhead tests: examples/
    train_with_cli.sh (3 steps) trains two prefixes on the demo model, then `prefix-kernels serve`
    serves both adapters as written, on a free loopback port. Yields (base URL, training folder)."""
    import queue
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("two-tasks")
    cli = f"{sys.executable} -m prefix_kernels.cli"
    env = {**os.environ, "PREFIX_KERNELS": cli, "STEPS": "3"}
    done = subprocess.run(["bash", str(root / "examples" / "train_with_cli.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from serve_utils import serve_cli

    server, urls, tail = serve_cli("--prefix", f"sentiment={out}/adapters/sentiment",
                                   "--prefix", f"topic={out}/adapters/topic")
    deadline = time.time() + 180
    try:
        while True:
            try:
                url = urls.get(timeout=0.5)
                break
            except queue.Empty:
                if server.poll() is not None or time.time() > deadline:
                    raise
        with urllib.request.urlopen(f"{url}/health", timeout=30):
            pass
    except (queue.Empty, OSError):
        server.kill()
        raise RuntimeError(f"the demo server did not start: {''.join(tail)[-3000:]}") from None
    try:
        yield url, out
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
