"""The scaling benchmark: its --quick smoke run (2 gloo processes) and the issue's verdicts."""
import json
import warnings

import pytest


@pytest.fixture(scope="module")
def bench():
    from prefix_kernels.bench import scaling
    return scaling


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")     # torchrun under pytest's capture
def test_quick_run_writes_json_and_png(bench, tmp_path, monkeypatch):
    warnings.filterwarnings("ignore", category=FutureWarning)
    monkeypatch.setenv("PREFIX_KERNELS_RESULTS", str(tmp_path))
    assert bench.main(["--quick", "--cases", "1.1b-1gpu", "1.1b-2gpu-ddp", "--warmup", "0", "--steps", "1"]) == 0
    payload = json.loads((tmp_path / "scaling-quick.json").read_text())
    assert [(r["case"], r["gpus"], r["strategy"]) for r in payload["results"]] == \
        [("1.1b-1gpu", 1, "none"), ("1.1b-2gpu-ddp", 2, "ddp")]
    for row in payload["results"]:
        assert row["tokens_per_s"] > 0 and row["loss"] > 0
    assert "gpus" in payload and payload["environment"]["git_commit"]
    assert (tmp_path / "scaling-quick.png").stat().st_size > 1000


def test_verdicts(bench):
    def row(case, tok, weights=None):
        return {"case": case, "tokens_per_s": tok, "weights_gib": weights, "peak_gib": weights}
    rows = [row("1.1b-1gpu", 100.0), row("1.1b-2gpu-ddp", 196.0),
            row("13b-2gpu-ddp", 10.0, 24.3), row("13b-2gpu-fsdp", 9.5, 12.2)]
    lines = bench.verdicts(rows)
    assert lines[0].startswith("required (2-GPU DDP >= 1.8x one GPU): PASS (1.960x); target 1.95x: MET")
    assert lines[1].startswith("required (FSDP2 halves the per-GPU weights): PASS")
    rows[1]["tokens_per_s"], rows[3]["weights_gib"] = 170.0, 20.0
    lines = bench.verdicts(rows + [{"case": "x", "error": "OOM"}])
    assert "FAIL (1.700x)" in lines[0] and "halves the per-GPU weights): FAIL" in lines[1]
    assert lines[2] == "x failed: OOM"
