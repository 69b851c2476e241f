"""`prefix-kernels` as a user meets it, through subprocesses (`python3 -m prefix_kernels.cli`, so
PYTHONPATH applies): --version, --help with defaults, one-line usage errors (exit 2) before any
model loads, the train demo's adapters served by the serve demo, re-running says it resumes, and
the main job without a GPU."""
import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from prefix_kernels import __version__, cli


def _cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "prefix_kernels.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_version_and_usage():
    done = _cli("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"prefix-kernels {__version__}")
    done = _cli("frobnicate")
    assert done.returncode == 2 and "invalid choice: 'frobnicate'" in done.stderr


def test_help_shows_defaults_everywhere(capsys):
    done = _cli("bench", "training", "--help")
    assert done.returncode == 0 and "usage: prefix-kernels bench training" in done.stdout
    assert "--cases" in done.stdout and "(default 10; quick 2)" in done.stdout
    for argv, shown in [(["train"], "(default: prefix-out)"), (["serve"], "127.0.0.1"),
                        (["serve"], "8000"), (["bench", "attention"], "default: bf16"),
                        (["bench", "decode"], "(default: 3)"), (["bench", "scaling"], "(default 8; quick 2)"),
                        (["bench", "decode-kernel"], "--sweep-splits"), (["info"], "usage: prefix-kernels info")]:
        assert cli.main([*argv, "--help"]) == 0, argv
        out = capsys.readouterr().out
        assert out.startswith(f"usage: prefix-kernels {' '.join(argv)}") and shown in out, (argv, out[-800:])
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.BENCHES)
    assert cli.main(["bench"]) == 2


def test_info_prints_the_package_version(capsys):
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["prefix-kernels:", __version__]


def test_missing_paths_are_one_line_errors_before_any_model_loads(tmp_path):
    """In a process where importing transformers fails: no model can have been loaded."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cases = [
        (["train", "--model", str(tmp_path / "missing"), "--data", str(data)], f"--model {tmp_path / 'missing'}: no such folder"),
        (["train", "--model", str(tmp_path / "not-a-model"), "--data", str(data)], "the folder has no config.json"),
        (["train", "--data", str(tmp_path / "none.jsonl")], f"--data {tmp_path / 'none.jsonl'}: no such file"),
        (["train", "--task", f"a={tmp_path / 'none.jsonl'}"], f"--task a={tmp_path / 'none.jsonl'}: no such file"),
        (["train", "--task", "a b=x.jsonl"], "the name must be 1-64 characters"),
        (["train", "--model", str(tmp_path / "model")], "--model needs --data FILE or --task NAME=FILE"),
        (["serve", "--model", "./missing-model"], "--model ./missing-model: no such folder"),
        (["serve", "--prefix", f"a={tmp_path / 'gone'}"], f"--prefix a={tmp_path / 'gone'}: no such folder"),
        (["serve", "--prefix", f"a={tmp_path / 'not-an-adapter'}"], "no adapter_config.json in it"),
        (["serve", "--prefix", "nameonly"], "--prefix takes NAME=PATH, got 'nameonly'"),
    ]
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        sys.modules["transformers"] = None          # any import of it fails loudly
        from prefix_kernels.cli import main
        results = []
        for argv in {[argv for argv, _ in cases]!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            results.append((code, err.getvalue()))
        print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for (argv, expected), (code, err) in zip(cases, json.loads(done.stdout)):
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith(f"prefix-kernels {argv[0]}: error: ") and expected in err, (argv, err)


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.load(response)


def test_train_demo_adapters_are_served_as_written(demo_server):
    url, out = demo_server
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        assert {m["id"] for m in json.load(response)["data"]} >= {"sentiment", "topic"}
    for name in ("sentiment", "topic"):
        status, body = _post(f"{url}/v1/completions", {"model": name, "prompt": "review: a dull film. sentiment:",
                                                       "max_tokens": 4, "temperature": 0})
        assert status == 200 and isinstance(body["choices"][0]["text"], str)
        assert body["usage"]["completion_tokens"] >= 1


def test_rerunning_training_says_it_resumes(demo_server):
    _, out = demo_server           # trained to step 3 of 3 by examples/train_with_cli.sh
    done = _cli("train", "--task", f"sentiment={out}/sentiment.jsonl", "--task", f"topic={out}/topic.jsonl",
                "--out", str(out), "--steps", "4", "--quiet", "--eval-fraction", "0.02", "--warmup-steps", "10",
                "--lr-schedule", "cosine")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint.pt'} at step 3 of 4 (--no-resume starts over)" in done.stderr
    assert "over 1 steps" in done.stderr      # this run's step only, not the resumed ones


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-GPU main job")
def test_main_job_without_a_gpu_is_honest(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # the CLI sets it itself
    env["PREFIX_KERNELS_RESULTS"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "prefix_kernels.cli", "bench", "attention", "--shape", "1,2,1,24,16,4",
                           "--shape", "2,2,1,16,16,3,2", "--repeats", "3"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cpu_part, gpu_part = done.stdout.split("3. Committed GPU results:")
    assert cpu_part.count("PASS") == 3 and "FAIL" not in cpu_part
    assert "CPU timings, float32" in cpu_part and "bf16" not in cpu_part
    assert "TFLOP/s" not in cpu_part and "None" not in cpu_part and " 0.0 " not in cpu_part
    assert gpu_part.startswith(" NVIDIA H200, bf16, measured 2026-") and "at commit 168e295bf23e" in gpu_part
    payload = json.loads((tmp_path / "attention-cpu.json").read_text())
    timings = payload["cpu_timings"]["rows"]
    assert {r["variant"] for r in timings} == {"prefix_kernels", "peft_bool_mask", "concat_lower_right", "floor"}
    for row in timings:
        lo, hi = row["fwd+bwd IQR"]
        assert 0 < lo <= row["fwd+bwd ms"] <= hi
    assert (tmp_path / "attention-cpu.png").stat().st_size > 5000
