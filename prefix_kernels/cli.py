"""`prefix-kernels bench | train | serve | info`."""
from __future__ import annotations

import sys

BENCHES = {
    "attention": "prefix_kernels.bench.attention",
    "serve": "prefix_kernels.bench.serve",
}


def _info(argv):
    import torch
    from .bench.common import environment
    for key, value in environment().items():
        print(f"{key:>12}: {value}")
    print(f"{'cuda avail':>12}: {torch.cuda.is_available()}")
    return 0


def _bench(argv):
    if not argv or argv[0] not in BENCHES:
        print(f"usage: prefix-kernels bench {{{','.join(BENCHES)}}} [options]\n"
              f"  e.g. prefix-kernels bench attention --help", file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:])


def _train(argv):
    from . import train
    return train.main(argv)


def _serve(argv):
    from .serve import launch
    return launch.main(argv)


COMMANDS = {"bench": _bench, "train": _train, "serve": _serve, "info": _info}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: prefix-kernels {" + ",".join(COMMANDS) + "} ...\n"
              "  bench attention   side-by-side attention benchmark (the main job)\n"
              "  train             prefix-tune a model on prompt/completion JSONL (no args: a CPU demo)\n"
              "  serve             OpenAI-compatible server, one model per prefix (no args: a CPU demo)\n"
              "  info              versions, GPU and git commit", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
