"""`prefix-kernels bench seq2seq --quick`: every case runs on a tiny BART and lands in the JSON and PNG."""
import json
import warnings

import pytest

from prefix_kernels.bench import seq2seq as bench


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def test_quick_run_writes_every_case(tmp_path):
    assert bench.main(["--quick", "--batches", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "seq2seq_quick.json").read_text())
    assert set(payload["environment"]) >= {"device", "torch", "transformers", "git_commit"}
    rows = payload["results"]
    assert [(r["case"], r["N"]) for r in rows] == [("engine", 1), ("engine", 2), ("engine-eager", 1),
                                                   ("engine-eager", 2), ("hf-generate", 1), ("hf-generate", 2),
                                                   ("peft", 1), ("peft", 2), ("bare-generate", "-")]
    for row in rows:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0
    engines = [r for r in rows if r["case"].startswith("engine")]
    assert all(r["decode_step_ms"] > 0 and r["limit_ms"] > 0 for r in engines)
    assert (tmp_path / "seq2seq_quick.png").stat().st_size > 1000
