"""The training benchmark's --quick smoke run: every case runs and lands in the JSON and PNG."""
import json
import warnings

import pytest

from prefix_kernels.bench import training as bench


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def test_quick_run_writes_every_case(tmp_path):
    assert bench.main(["--quick", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "training_quick.json").read_text())
    assert set(payload["environment"]) >= {"gpu", "torch", "triton", "transformers", "git_commit"}
    for shape, rows in payload["results"].items():
        assert [r["case"] for r in rows] == bench.CASES, shape
        for row in rows:
            assert "error" not in row, row
            assert row["tokens_per_s"] > 0 and row["final_loss"] > 0
        assert payload["verdicts"][shape]
    assert (tmp_path / "training_quick.png").stat().st_size > 1000
