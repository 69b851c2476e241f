"""`prefix-kernels`: the command line.

    prefix-kernels bench {attention,training,decode,decode-kernel,seq2seq,serve,scaling} [options]
    prefix-kernels train [options]       # no options: a demo on the CPU
    prefix-kernels serve [options]       # no options: a demo on the CPU
    prefix-kernels info

Exit status: 0 done, 1 a failure while running, 2 a command line that cannot work (a missing
file or folder, a bad option), said in one line before any model loads.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from . import __version__
from .cli_common import UsageError, check_adapter_dir, check_model_arg, first_line, parse_named
from .cli_common import parser as cli_parser

# name -> (module with main(argv), one line of help)
BENCHES = {
    "attention": ("prefix_kernels.bench.attention", "prefix attention vs SDPA / PEFT / FlexAttention (the main job; "
                                                    "no GPU: kernel checks and CPU timings)"),
    "training": ("prefix_kernels.bench.training", "a training step vs PEFT prefix, LoRA, full fine-tuning; "
                                                  "loss vs time; several tasks in one run"),
    "decode": ("prefix_kernels.bench.decode", "end-to-end generation: the serving engine vs PEFT and HF generate"),
    "decode-kernel": ("prefix_kernels.bench.decode_kernel", "the decode kernel alone: CUDA vs Triton vs SDPA"),
    "seq2seq": ("prefix_kernels.bench.seq2seq", "encoder-decoder generation (BART-large shape): Seq2SeqEngine vs "
                                                "HF generate and PEFT"),
    "serve": ("prefix_kernels.bench.serve", "the HTTP server under concurrent clients vs the engine alone"),
    "scaling": ("prefix_kernels.bench.scaling", "training on 1 and 2 GPUs: DDP, FSDP2"),
}
COMMANDS = {
    "bench": "benchmarks (each writes a table, JSON and a plot)",
    "train": "prefix-tune a model on prompt/completion JSONL, one prefix per task (no options: a CPU demo)",
    "serve": "OpenAI-compatible server, one model name per prefix (no options: a CPU demo)",
    "info": "the package version, library versions, device and git commit",
}


def _top_parser() -> argparse.ArgumentParser:
    parser = cli_parser("prefix-kernels", __doc__)
    parser.add_argument("--version", action="version", version=f"prefix-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, description=text, formatter_class=parser.formatter_class)
    return parser


def _bench_parser() -> argparse.ArgumentParser:
    parser = cli_parser("prefix-kernels bench", "Benchmarks; `prefix-kernels bench NAME --help` for each one's options.")
    sub = parser.add_subparsers(dest="name", metavar="{" + ",".join(BENCHES) + "}")
    for name, (_, text) in BENCHES.items():
        sub.add_parser(name, help=text)
    return parser


def _info(argv: list[str]) -> int:
    """Print the package version, then the environment every benchmark records."""
    import torch

    from .bench.common import environment

    print(f"{'prefix-kernels':>14}: {__version__}")
    for key, value in environment().items():
        print(f"{key:>14}: {value}")
    print(f"{'cuda available':>14}: {torch.cuda.is_available()}")
    return 0


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        _bench_parser().print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        raise UsageError(f"no benchmark {name!r}; choose from {', '.join(BENCHES)}")
    module_name = BENCHES[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise UsageError(f"`bench {name}` is not in this version of prefix-kernels") from None
    return module.main(rest)


def _train(argv: list[str]) -> int:
    from . import train

    return train.main(argv)


def check_serve_args(argv: list[str]) -> None:
    """`serve`'s paths, checked before any model loads: --model, and each --prefix NAME=DIR an
    adapter folder (with no --model, one trained on the demo model)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--prefix", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    check_model_arg(known.model)
    for name, folder in parse_named(known.prefix, "--prefix").items():
        check_adapter_dir(folder, f"--prefix {name}=")
        if known.model is None:
            _check_demo_adapter(name, folder)


def _check_demo_adapter(name: str, folder: str) -> None:
    import json

    from .demo import DEMO_MODEL_NAME

    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--prefix {name}={folder}: unreadable adapter_config.json ({first_line(e)})") from None
    if base != DEMO_MODEL_NAME:
        trained_on = f"was trained on {base!r}, not the demo model" if base else "names no base model"
        raise UsageError(f"--prefix {name}={folder}: the adapter {trained_on}; pass --model {base or 'PATH'}")


def _serve(argv: list[str]) -> int:
    if not {"-h", "--help"} & set(argv):
        check_serve_args(argv)
    from .serve import launch

    return launch.main(argv)


HANDLERS: dict[str, Callable[[list[str]], int]] = {"bench": _bench, "train": _train, "serve": _serve,
                                                   "info": _info}


def _run(prog: str, handler: Callable[[list[str]], int], argv: list[str]) -> int:
    """A command's exit status: its own, 2 for a usage error, 1 for an error while running."""
    try:
        code = handler(argv)
    except SystemExit as e:          # argparse (0 or 2), or a message meant for the user
        if isinstance(e.code, str):
            print(f"{prog}: error: {e.code}", file=sys.stderr)
            return 2
        return e.code or 0
    except UsageError as e:
        print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("PREFIX_KERNELS_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {type(e).__name__}: {first_line(e)}\n"
              "  (PREFIX_KERNELS_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    return code or 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prefix-kernels` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("bench", "train", "serve"):      # they parse their own options
        return _run(f"prefix-kernels {argv[0]}", HANDLERS[argv[0]], argv[1:])
    parser = _top_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _run(f"prefix-kernels {args.command}", HANDLERS[args.command], [])


if __name__ == "__main__":
    sys.exit(main())
