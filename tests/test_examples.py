"""The scripts in examples/ run as documented (their quick forms): the CLI one is the demo_server
fixture itself (examples/train_with_cli.sh), the others run here in this process."""
import importlib.util
import os
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def test_openai_client_against_the_served_adapters(demo_server, capsys):
    url, _ = demo_server
    assert _example("serve_openai_client").main(["--base-url", f"{url}/v1", "--max-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sentiment", "topic"]


def test_mixed_prefixes_in_a_batch_equal_each_row_alone(demo_server, capsys):
    _, out = demo_server
    argv = [f"--adapter={name}={out}/adapters/{name}" for name in ("sentiment", "topic")]
    assert _example("mix_prefixes_in_a_batch").main([*argv, "--max-new-tokens", "4"]) == 0
    out_lines = capsys.readouterr().out.splitlines()
    assert len(out_lines) == 4 and all(line.endswith("(same as alone: True)") for line in out_lines)


def test_trainer_example_saves_one_adapter_per_task(tmp_path):
    assert _example("train_with_trainer").main(["--steps", "2", "--out", str(tmp_path)]) == 0
    for task in ("sentiment", "topic"):
        assert {"adapter_config.json", "adapter_model.safetensors"} == set(os.listdir(tmp_path / "adapters" / task))
