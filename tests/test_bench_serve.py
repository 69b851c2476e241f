"""`prefix-kernels bench serve --quick`: the real server, the engine beside it, clients in a process
of their own; every concurrency lands in the JSON and the PNG, with no errors."""
import json
import subprocess
import sys
import warnings

import pytest

from prefix_kernels.bench import serve


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def test_quick_run_writes_every_concurrency(tmp_path):
    assert serve.main(["--quick", "--requests-per-client", "2", "--rates", "50", "--rate-requests", "4",
                       "--rounds", "2", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "serve_quick.json").read_text())
    assert set(payload["environment"]) >= {"device", "torch", "transformers", "git_commit"}
    assert payload["aiohttp"] and payload["clients"] == "process"
    rows = payload["results"]
    assert [(r["mode"], r["C"]) for r in rows] == [("concurrency", 1), ("concurrency", 4), ("rate", "-")]
    for row in rows:
        assert row["errors"] == 0, row
        assert row["tokens"] == row["requests"] * payload["new_tokens"]
        assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0
    for row in rows[:2]:
        assert row["engine_tokens_per_s"] > 0 and row["ratio"] == pytest.approx(
            row["tokens_per_s"] / row["engine_tokens_per_s"])
        # the median of the interleaved rounds (the lower middle of two)
        assert len(row["engine_rounds_tokens_per_s"]) == len(row["http_rounds_tokens_per_s"]) == 2
        assert row["engine_tokens_per_s"] == pytest.approx(min(row["engine_rounds_tokens_per_s"]), abs=0.1)
        assert row["tokens_per_s"] == pytest.approx(min(row["http_rounds_tokens_per_s"]), abs=0.1)
    assert [v.split(":")[0] for v in payload["verdicts"]] == ["required C=1", "required C=4"]
    assert (tmp_path / "serve_quick.png").stat().st_size > 1000


def test_serve_without_aiohttp_says_how_to_install_it():
    code = ("import sys; sys.modules['aiohttp'] = None\n"
            "from prefix_kernels.serve import launch\n"
            "sys.exit(launch.main(['--port', '0']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "prefix-kernels serve needs aiohttp: pip install 'prefix-kernels[serve]' " \
                                  "(or: pip install aiohttp)"


def test_quick_run_with_the_experimental_prefill_wait(tmp_path):
    """Engine(prefill_wait=...) behind the real server: requests held for others still all finish."""
    assert serve.main(["--quick", "--concurrency", "4", "--requests-per-client", "2", "--prefill-wait", "0.02",
                       "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "serve_quick.json").read_text())
    assert payload["prefill_wait"] == 0.02
    (row,) = payload["results"]
    assert row["errors"] == 0 and row["tokens"] == row["requests"] * payload["new_tokens"]
