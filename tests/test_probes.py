"""The GPU probes' own code, on the CPU: a probe that fails on the device wastes its minutes.

Each probe's --cpu-smoke mode runs every code path it has on tiny shapes (the interpreter's
kernels, the PyTorch stand-ins for the vendor kernels); its times mean nothing."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, tmp_path, *args):
    env = dict(os.environ, TRITON_INTERPRET="1", PREFIX_KERNELS_RESULTS=str(tmp_path), TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--cpu-smoke", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def test_probe_split_smoke(tmp_path):
    out = _run("probe_split.py", tmp_path, "--variants", "cudnn_noprefix,auto,fused,split_cudnn_merge")
    assert "ratio = cuDNN no-prefix ms / variant ms" in out
    timings = json.loads((tmp_path / "probe_split.json").read_text())["timings"]
    rows = {(r["shape"], r["variant"]): r for r in timings}
    for shape in {r["shape"] for r in timings}:
        for variant in ("auto", "fused", "split_cudnn_merge"):
            assert "fwd+bwd vs cuDNN" in rows[(shape, variant)], rows[(shape, variant)]


def test_probe_host_parts_smoke(tmp_path):
    out = _run("probe_host_parts.py", tmp_path)
    record = json.loads(out.strip().splitlines()[-1])
    for key in ("fwd_us", "fwd_bwd_us", "launch_backward_us", "launch_us", "specialization_key_us",
                "autograd_roundtrip_us"):
        assert key in record, key
    assert set(record["launch_us"]) >= {"dq", "dkdv"}
    assert (tmp_path / "probe_host_parts-this.json").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
