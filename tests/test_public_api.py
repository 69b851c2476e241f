"""The typed public API: py.typed shipped, a docstring on every public name and type hints on every
public function and method; a LICENSE matching pyproject's; a CHANGELOG."""
import importlib
import inspect
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
# (module, names): the package's __all__s, and the public names of modules users import directly
PUBLIC = [("prefix_kernels", None), ("prefix_kernels.serve", None), ("prefix_kernels.train", None),
          ("prefix_kernels.integrations.trainer", None),
          ("prefix_kernels.integrations.saving", ["save_patched_model", "load_adapters", "adapter_folders"]),
          ("prefix_kernels.checkpoint", ["save_checkpoint", "load_for_resume", "write_folder_atomically",
                                         "CheckpointError"]),
          ("prefix_kernels.demo", ["demo_model", "demo_tokenizer", "demo_examples", "demo_prefixes"]),
          ("prefix_kernels.cli", ["main"])]


def _public_callables():
    for module_name, names in PUBLIC:
        module = importlib.import_module(module_name)
        for name in names or module.__all__:
            obj = getattr(module, name)
            if not callable(obj):
                continue
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(value, property):
                        yield f"{module_name}.{name}.{attr}", value.fget
                    elif inspect.isfunction(value):
                        yield f"{module_name}.{name}.{attr}", value


def test_every_public_name_has_a_docstring_and_type_hints():
    problems = []
    for name, obj in _public_callables():
        if not inspect.getdoc(obj):
            problems.append(f"{name}: no docstring")
        if inspect.isclass(obj) or not inspect.isfunction(inspect.unwrap(obj)):
            continue
        sig = inspect.signature(obj)
        bare = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")
                and p.annotation is inspect.Parameter.empty]
        if bare:
            problems.append(f"{name}: parameters without a type hint: {bare}")
        if sig.return_annotation is inspect.Signature.empty:
            problems.append(f"{name}: no return type hint")
    assert not problems, "\n".join(problems)


def test_typed_marker_license_and_changelog():
    assert (ROOT / "prefix_kernels" / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"]["text"] == "Apache-2.0"
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["prefix_kernels"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = importlib.import_module("prefix_kernels").__version__
    assert f"## {version}" in changelog or "## Unreleased" in changelog


@pytest.mark.parametrize("extra", ["bench", "test"])
def test_plots_and_progress_bars_are_an_extra(extra):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not {"matplotlib", "tqdm"} & set(project["dependencies"])
    assert {"matplotlib", "tqdm"} <= set(project["optional-dependencies"][extra])


def test_without_the_bench_extra_plots_and_bars_are_skipped_with_a_note(monkeypatch, capsys):
    from prefix_kernels.bench import common
    from prefix_kernels.train_log import progress_bar

    for name in ("matplotlib", "matplotlib.pyplot", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(__import__("sys").modules, name, None)      # import fails
    assert common.pyplot() is None
    bar = common.progress([1, 2, 3], desc="x")
    assert list(bar) == [1, 2, 3]
    train_bar = progress_bar(total=2, initial=0, enabled=True)
    train_bar.update(1)
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes[0] == "matplotlib is not installed: no plot (pip install 'prefix-kernels[bench]')"
    assert notes[1] == "tqdm is not installed: no progress bar (pip install 'prefix-kernels[bench]')"
    assert notes[2].startswith("tqdm is not installed: progress as plain lines")
