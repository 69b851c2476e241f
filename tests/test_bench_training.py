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
            if row["case"] == "prefix-kernels-cudnn-fe":     # CUDA and the frontend package only: says why
                assert "cuDNN frontend" in row["error"], row
                continue
            assert "error" not in row, row
            assert row["tokens_per_s"] > 0 and row["final_loss"] > 0
        assert payload["verdicts"][shape]
    assert (tmp_path / "training_quick.png").stat().st_size > 1000


def test_loss_curves_quick(tmp_path):
    """--curves --quick (llama only: the GPT-2 dropout and BART rows need features still being built):
    every method's curve lands in the JSON, ours and PEFT's prefix start from the same prefix and
    follow the same losses (fp32, same math)."""
    assert bench.main(["--curves", "--quick", "--steps", "3", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "training-curves-quick.json").read_text())
    rows = {r["method"]: r for r in payload["results"]}
    assert list(rows) == ["prefix-kernels", "peft-prefix", "peft-lora-r8", "full-finetune"]
    for row in rows.values():
        assert "error" not in row, row
        assert len(row["loss"]) == len(row["seconds"]) == 3 and row["seconds"] == sorted(row["seconds"])
    ours, peft = rows["prefix-kernels"]["loss"], rows["peft-prefix"]["loss"]
    assert max(abs(a - b) for a, b in zip(ours, peft)) < 1e-4
    assert payload["verdicts"][0].startswith("llama: ours vs PEFT prefix, largest loss gap")
    assert (tmp_path / "training-curves-quick.png").stat().st_size > 5000


def test_loss_curves_quick_gpt2_bart(tmp_path):
    """--curves --quick for GPT-2 (attention dropout 0.1) and BART (ours at three sites and at
    PEFT's one): every row runs, and each of ours gets a tokens/s verdict against PEFT's."""
    assert bench.main(["--curves", "--quick", "--archs", "gpt2,bart", "--steps", "2", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "training-curves-quick.json").read_text())
    rows = [(r["arch"], r["method"]) for r in payload["results"]]
    assert rows == [("gpt2", "prefix-kernels"), ("gpt2", "peft-prefix"), ("bart", "prefix-kernels"),
                    ("bart", "prefix-kernels-decoder"), ("bart", "peft-prefix")]
    assert all("error" not in r for r in payload["results"]), payload["results"]
    speed = [line for line in payload["verdicts"] if "tokens/s vs PEFT prefix" in line]
    assert [line.split(":")[0] for line in speed] == ["gpt2", "bart", "bart"]
    assert any(line.startswith("bart: the curves differ by design") for line in payload["verdicts"])


def test_loss_curves_rounds_interleave_ours_and_peft(tmp_path):
    """--rounds 2: the second round reruns ours and PEFT's prefix only (not LoRA or full
    fine-tuning), the plot keeps the first round, and the speed verdict lists both rounds."""
    assert bench.main(["--curves", "--quick", "--rounds", "2", "--steps", "2", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "training-curves-quick.json").read_text())
    second = [r["method"] for r in payload["results"] if r["round"] == 1]
    assert second == ["prefix-kernels", "peft-prefix"]
    assert all(r["median_step_ms"] > 0 for r in payload["results"])
    speed = [line for line in payload["verdicts"] if "tokens/s vs PEFT prefix" in line]
    assert len(speed) == 1 and "rounds " in speed[0], speed


def test_speed_verdict_is_the_median_of_per_round_ratios():
    from prefix_kernels.bench import training_curves as curves

    def row(method, rnd, ms):
        return {"arch": "gpt2", "method": method, "round": rnd, "median_step_ms": ms, "loss": [2.0, 1.0],
                "seconds": [0.1, 0.2], "tokens_per_s": 1000.0 / ms, "lr": 0.01}
    rows = [row("prefix-kernels", 0, 30.0), row("peft-prefix", 0, 27.0),      # ours 0.90x
            row("prefix-kernels", 1, 25.0), row("peft-prefix", 1, 30.0),      # ours 1.20x
            row("prefix-kernels", 2, 20.0), row("peft-prefix", 2, 21.0)]      # ours 1.05x
    assert [round(x, 2) for x in curves.speed_ratios(rows, "gpt2", "prefix-kernels")] == [0.9, 1.2, 1.05]
    speed = [line for line in curves.verdicts(rows) if "tokens/s vs PEFT prefix" in line]
    assert "median step 1.05x PEFT's speed" in speed[0] and "(at least PEFT)" in speed[0], speed


def test_time_to_loss_when_ours_ends_a_rounding_error_above_peft():
    """Same math, bf16: ours may end 5e-4 above PEFT's final loss and never reach it exactly;
    both runs reach the higher of the two final losses, and the verdict times that."""
    from prefix_kernels.bench import training_curves as curves

    def row(method, loss, seconds):
        return {"arch": "llama", "method": method, "round": 0, "median_step_ms": 10.0, "loss": loss,
                "seconds": seconds, "tokens_per_s": 100.0, "lr": 0.01}
    rows = [row("prefix-kernels", [3.0, 2.0, 1.0005], [0.1, 0.2, 0.3]),
            row("peft-prefix", [3.0, 2.0, 1.0], [0.2, 0.4, 0.6])]
    line = next(v for v in curves.verdicts(rows) if "reached after" in v)
    assert "the higher final loss 1.0005 reached after 0.30 s (ours) vs 0.60 s (PEFT): 2.00x sooner" in line, line


def test_multitask_quick(tmp_path):
    """--multitask --quick: one run of 2 tasks and the same tasks one by one take the same path."""
    assert bench.main(["--multitask", "--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "multitask-quick.json").read_text())
    assert [r["way"] for r in payload["results"]] == ["one run", "one by one"]
    assert all(len(r["losses"]) == 2 and all(len(l) == 3 for l in r["losses"]) for r in payload["results"])
    assert payload["max_loss_gap"] < 1e-4
    assert (tmp_path / "multitask-quick.png").stat().st_size > 5000
