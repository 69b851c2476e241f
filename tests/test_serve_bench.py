"""The end-to-end decode benchmark's --quick smoke run: every case runs and lands in the JSON and PNG."""
import json
import warnings

import pytest

from prefix_kernels.bench import decode as bench


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def test_quick_run_writes_every_case(tmp_path):
    assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "decode_e2e_quick.json").read_text())
    assert set(payload["environment"]) >= {"device", "torch", "triton", "transformers", "git_commit"}
    rows = payload["results"]
    assert {(r["B"], r["N"], r["case"]) for r in rows} == {
        (1, 1, "engine"), (1, 1, "peft"), (1, "-", "hf-generate"),
        (4, 1, "engine"), (4, 2, "engine"), (4, 4, "engine"), (4, 1, "peft"), (4, 2, "peft"), (4, 4, "peft"),
        (4, "-", "hf-generate"), (1, "-", "hf-compiled"), (1, "-", "plain-step"), (4, "-", "hf-compiled"),
        (4, "-", "plain-step"), (1, 1, "engine-eager"), (4, 4, "engine-eager")}
    for row in rows:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0
    assert any(v.startswith("required B=4 N=2") for v in payload["verdicts"])
    assert any(v.startswith("required B=4: engine step") for v in payload["verdicts"])
    assert {r["case"] for r in payload["decode_steps"]} >= {"engine N=4", "engine-eager N=4", "hf-compiled",
                                                           "plain-step"}
    assert (tmp_path / "decode_e2e_quick.png").stat().st_size > 1000


def test_quick_run_of_the_experimental_compiled_prefill(tmp_path):
    """Named in --cases (not in the default run): the engine with compiled_prefill=True runs beside
    the engine, both rows report their prefill time."""
    assert bench.main(["--quick", "--repeats", "1", "--batches", "4", "--cases", "engine",
                       "engine-compiled-prefill", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode_e2e_quick.json").read_text())["results"]
    assert {(r["N"], r["case"]) for r in rows} == {(1, "engine"), (2, "engine"), (4, "engine"),
                                                   (4, "engine-compiled-prefill")}
    assert all("error" not in r and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows), rows
