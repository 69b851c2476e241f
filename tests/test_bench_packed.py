"""The packed-sequences benchmark's --quick smoke run: every case runs, packed and padded train on
the same targets (equal first loss), and the JSON holds the speed-ups."""
import json
import warnings

from prefix_kernels.bench import packed as bench


def test_quick_run_writes_every_case(tmp_path, monkeypatch):
    warnings.filterwarnings("ignore", category=FutureWarning)
    monkeypatch.setenv("PREFIX_KERNELS_RESULTS", str(tmp_path))
    assert bench.main(["--quick", "--docs", "4", "--cases", "prefix-kernels-packed", "prefix-kernels-padded"]) == 0
    payload = json.loads((tmp_path / "packed_quick.json").read_text())
    rows = {r["case"]: r for r in payload["results"]}
    assert set(rows) == {"prefix-kernels-packed", "prefix-kernels-padded"}
    assert rows["prefix-kernels-packed"]["padding_fraction"] == 0
    assert abs(rows["prefix-kernels-packed"]["first_loss"] - rows["prefix-kernels-padded"]["first_loss"]) < 1e-4
    assert payload["speedups"]["packed_vs_prefix-kernels-padded"] > 0
