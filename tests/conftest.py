import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def kernel_device() -> str:
    """Where the Triton kernels can run: the GPU, else the CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (the README's test command sets it)")


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """The CLI end to end, shared by the CLI, example and server-overhead tests: examples/
    train_with_cli.sh (3 steps) trains two prefixes on the demo model, then `prefix-kernels serve`
    serves both adapters as written, on a free loopback port. Yields (base URL, training folder)."""
    import socket
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "prefix_kernels.cli", "serve", "--port", str(port),
                               "--prefix", f"sentiment={out}/adapters/sentiment", "--prefix", f"topic={out}/adapters/topic"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})      # steadier on 2 shared cores
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(f"the demo server did not start: {server.stderr.read()[-3000:]}")
            time.sleep(0.5)
    try:
        yield url, out
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
