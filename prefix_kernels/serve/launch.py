"""`prefix-kernels serve`: build an Engine from the command line and serve it over HTTP.

    prefix-kernels serve --model PATH --prefix support=adapters/support --prefix legal=adapters/legal
    prefix-kernels serve                      # no --model: a tiny random demo model on the CPU
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from ..cli_common import HelpFormatter

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _parser():
    p = argparse.ArgumentParser(prog="prefix-kernels serve", description="OpenAI-compatible server, one "
                                "model per prefix (the request's 'model' field picks the prefix)",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="a transformers causal LM (folder or hub id); omit for a tiny CPU demo")
    p.add_argument("--prefix", action="append", default=[], metavar="NAME=DIR",
                   help="a prefix-tuning adapter (PEFT format) served as model NAME; repeat for more")
    p.add_argument("--tokenizer", help="tokenizer folder or id (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="concurrent requests (KV-cache slots)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="prompt + output tokens per request")
    p.add_argument("--max-prefixes", type=int, default=64, help="bank capacity (prefixes added later included)")
    p.add_argument("--queue-size", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, else float32")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly")
    p.add_argument("--log-level", default="INFO")
    return p


def _named_dirs(pairs):
    out = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--prefix takes NAME=DIR, got {pair!r}")
        if name in out:
            raise SystemExit(f"--prefix {name} is given twice")
        out[name] = folder
    return out


def demo_engine_inputs(adapters=None):
    """(model, prefixes, tokenizer) of the demo: `prefix-kernels train`'s demo model and byte
    tokenizer (prefix_kernels/demo.py), serving the given {name: adapter folder} (what the train
    demo writes) or, with none, two random prefixes."""
    from ..demo import demo_model, demo_prefixes, demo_tokenizer

    model = demo_model().eval()
    return model, dict(adapters) if adapters else demo_prefixes(model), demo_tokenizer()


def build(args):
    """(engine, model name) from parsed arguments."""
    from .engine import Engine

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.model is None:
        model, prefixes, tokenizer = demo_engine_inputs(_named_dirs(args.prefix))
        name = "prefix-kernels-demo"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        prefixes = _named_dirs(args.prefix)
        if not prefixes:
            raise SystemExit("serve needs at least one --prefix NAME=DIR (a prefix-tuning adapter)")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        name = args.model
    model = model.to(device, dtype)
    engine = Engine(model, prefixes, tokenizer=tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    max_prefixes=args.max_prefixes, queue_size=args.queue_size,
                    cuda_graphs=False if args.no_cuda_graphs else None)
    return engine, name


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .server import Server

    engine, name = build(args)
    engine.warmup()
    server = Server(engine, args.host, args.port, model_name=name)
    first = engine.prefixes[0]
    print(f"serving {name} with prefixes {engine.prefixes} on {server.url}\n"
          f"  curl {server.url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{first}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0
