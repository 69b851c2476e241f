"""The wheel ships csrc/ (as prefix_kernels/_csrc) so an installed package can JIT-build the
decode kernel without a source checkout."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_cuda_sources_typing_marker_and_gpu_results(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                               "results", ".pytest_cache"))
    (src / "benchmarks" / "results").mkdir()
    shutil.copy(ROOT / "benchmarks" / "results" / "attention-h200.json", src / "benchmarks" / "results")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("prefix_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("prefix_kernels/_csrc/")}
    expected = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    assert expected and expected <= shipped, f"wheel lacks {sorted(expected - shipped)}"
    # what `prefix-kernels bench attention` prints without a GPU, and the typing marker
    assert {"prefix_kernels/bench/results/attention-h200.json", "prefix_kernels/py.typed"} <= names


def test_csrc_dir_prefers_the_shipped_copy(tmp_path, monkeypatch):
    from prefix_kernels.ops import _build

    monkeypatch.delenv("PREFIX_KERNELS_CSRC", raising=False)
    assert (_build.csrc_dir() / "decode_attention.cu").is_file()
    monkeypatch.setenv("PREFIX_KERNELS_CSRC", str(tmp_path))
    assert _build.csrc_dir() == tmp_path
