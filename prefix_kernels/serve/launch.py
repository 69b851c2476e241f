"""`prefix-kernels serve`: build an Engine from the command line and serve it over HTTP.

    prefix-kernels serve --model PATH --prefix support=adapters/support --prefix legal=adapters/legal
    prefix-kernels serve                      # no --model: a tiny random demo model on the CPU
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..cli_common import HelpFormatter, prefill_wait

DTYPES = ("bfloat16", "float16", "float32")
DECODER_ONLY_MAX_SEQ_LEN = 2048      # --max-seq-len's default for a decoder-only model
INSTALL_HINT = "prefix-kernels serve needs aiohttp: pip install 'prefix-kernels[serve]' (or: pip install aiohttp)"


def _parser():
    p = argparse.ArgumentParser(prog="prefix-kernels serve", formatter_class=HelpFormatter,
                                description="OpenAI-compatible server, one model per prefix (the request's 'model' "
                                "field picks the prefix)")
    p.add_argument("--model", help="a transformers causal LM, or an encoder-decoder LM such as BART (folder or hub "
                   "id); omit for a tiny CPU demo")
    p.add_argument("--prefix", action="append", default=[], metavar="NAME=DIR",
                   help="a prefix-tuning adapter (PEFT format) served as model NAME; repeat for more")
    p.add_argument("--tokenizer", help="tokenizer folder or id (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (a non-loopback one wants --api-key)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=32, help="concurrent requests (KV-cache slots)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + output tokens per request (default 2048); encoder-decoder models: the "
                        "decoder's tokens (default 256)")
    g.add_argument("--max-source-len", type=int,
                   help="encoder-decoder models: source tokens per request (default: the model's position limit, "
                        "at most 1024)")
    g.add_argument("--max-prefixes", type=int, default=64, help="bank capacity (prefixes added later included)")
    g.add_argument("--queue-size", type=int, default=256, help="waiting requests before 429")
    g.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens prefilled per engine step (between decode steps)")
    g.add_argument("--prefill-wait", type=prefill_wait, default=0.0,
                   help="experimental: seconds a new prompt may wait for others while rows decode, so "
                        "that arrivals share one prefill forward (Engine(prefill_wait=...)); 'auto': as "
                        "long as a prefill forward costs; 0: off")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, else float32")
    g.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly")
    g.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine in a process of its own, so the HTTP front never shares a GIL with it "
                        "(serve/remote.py; in one process an H100's HTTP throughput at 64 clients was 0.87x "
                        "the engine's own, in two 1.06x)")
    g.add_argument("--decode-step", default="auto", choices=["auto", "compiled", "eager"],
                   help="auto: the compiled step (serve/step.py) on CUDA for Llama/Mistral/Qwen2/Qwen3/Phi-3/"
                        "Gemma, else the model's own modules (eager)")
    g = p.add_argument_group("access")
    g.add_argument("--api-key", action="append", default=[],
                   help="a key the OpenAI routes require as 'Authorization: Bearer KEY' (repeat for several "
                        "clients); also PREFIX_KERNELS_API_KEY, comma-separated")
    g.add_argument("--enable-admin", action="store_true",
                   help="turn on POST /v1/prefixes and DELETE /v1/prefixes/NAME (needs --admin-key, --adapter-root)")
    g.add_argument("--admin-key", help="the key of the admin routes; also PREFIX_KERNELS_ADMIN_KEY")
    g.add_argument("--adapter-root", help="the only folder POST /v1/prefixes may load adapters from")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed to call the API (e.g. https://app.example); repeat")
    g.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="a Host header accepted besides the loopback names; repeat")
    g = p.add_argument_group("limits")
    g.add_argument("--max-tokens-cap", type=int, help="max_tokens at most (default: --max-seq-len)")
    g.add_argument("--max-prompt-bytes", type=int, help="prompt bytes, checked before tokenizing "
                   "(default: 32 x --max-seq-len)")
    g.add_argument("--max-body-bytes", type=int, help="request body bytes (default: max(1 MiB, 8 x max prompt bytes))")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds a generation may take (504 after)")
    g.add_argument("--read-timeout", type=float, default=30.0, help="seconds to receive a request's head, and body")
    g.add_argument("--keepalive-timeout", type=float, default=5.0, help="idle seconds before a connection closes")
    g.add_argument("--max-connections", type=int, default=1024, help="open connections; more get 503")
    g.add_argument("--backlog", type=int, default=2048, help="the listen backlog (connections not yet accepted)")
    g.add_argument("--client-max-requests", type=int, default=0,
                   help="requests in flight per client (API key, else address); 0: no limit")
    g.add_argument("--client-max-tokens", type=int, default=0,
                   help="max_tokens in flight per client; 0: no limit")
    g.add_argument("--poll-interval", type=float, default=0.004,
                   help="seconds between the server's looks at the engine's new tokens (one write per stream each)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the requests in flight get to finish")
    g = p.add_argument_group("logs")
    g.add_argument("--log-prompts", action="store_true", help="put prompt text in the request log lines")
    g.add_argument("--log-level", default="INFO")
    return p


def _named_dirs(pairs):
    from ..bank import validate_name

    out = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--prefix takes NAME=DIR, got {pair!r}")
        try:
            validate_name(name)
        except ValueError as e:
            raise SystemExit(f"--prefix: {e}") from None
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
    import torch

    from .engine import serve_engine

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    options = dict(max_batch=args.max_batch, max_prefixes=args.max_prefixes,
                   queue_size=args.queue_size, prefill_chunk=args.prefill_chunk, prefill_wait=args.prefill_wait,
                   cuda_graphs=False if args.no_cuda_graphs else None, decode_step=args.decode_step)
    if args.max_seq_len is not None:
        options["max_seq_len"] = args.max_seq_len
    if args.model is None:
        _check_model_kind(args, seq2seq=False)
        options.setdefault("max_seq_len", DECODER_ONLY_MAX_SEQ_LEN)
        model, prefixes, tokenizer = demo_engine_inputs(_named_dirs(args.prefix))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        prefixes = _named_dirs(args.prefix)
        if not prefixes:
            raise SystemExit("serve needs at least one --prefix NAME=DIR (a prefix-tuning adapter)")
        seq2seq = bool(getattr(AutoConfig.from_pretrained(args.model), "is_encoder_decoder", False))
        _check_model_kind(args, seq2seq)         # before the weights load
        if seq2seq:
            options["max_source_len"] = args.max_source_len
        else:
            options.setdefault("max_seq_len", DECODER_ONLY_MAX_SEQ_LEN)
        loader = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = loader.from_pretrained(args.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = model.to(device, dtype)
    return serve_engine(model, prefixes, tokenizer=tokenizer, **options), model_name(args)


def _check_model_kind(args, seq2seq: bool) -> None:
    """The options that only one kind of model takes (SystemExit naming the option)."""
    if seq2seq and args.decode_step == "compiled":
        raise SystemExit("--decode-step compiled covers decoder-only models; an encoder-decoder model runs its "
                         "own modules (auto or eager)")
    if not seq2seq and args.max_source_len is not None:
        raise SystemExit("--max-source-len is for encoder-decoder models (their encoder's input)")


def model_name(args) -> str:
    """The name /v1/models gives the base model (no server path)."""
    return "prefix-kernels-demo" if args.model is None else os.path.basename(os.path.normpath(args.model))


def build_warm(args):
    """The engine from parsed arguments, warmed up (what --engine-process runs in its process,
    which logs as the server does)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine, _ = build(args)
    engine.warmup()
    return engine


def server_options(args) -> dict:
    """ServerConfig fields from parsed arguments (and the key environment variables)."""
    from .server import default_api_keys

    return dict(api_keys=tuple(args.api_key) + default_api_keys(),
                admin_key=args.admin_key or os.environ.get("PREFIX_KERNELS_ADMIN_KEY") or None,
                enable_admin=args.enable_admin, adapter_root=args.adapter_root,
                allowed_origins=tuple(args.allowed_origin), allowed_hosts=tuple(args.allowed_host),
                max_body_bytes=args.max_body_bytes, max_prompt_bytes=args.max_prompt_bytes,
                max_tokens_cap=args.max_tokens_cap, request_timeout=args.request_timeout,
                read_timeout=args.read_timeout, keepalive_timeout=args.keepalive_timeout,
                max_connections=args.max_connections, backlog=args.backlog, drain_timeout=args.drain_timeout,
                client_max_requests=args.client_max_requests, client_max_tokens=args.client_max_tokens,
                log_prompts=args.log_prompts, poll_interval=args.poll_interval)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .server import Server

    options = server_options(args)
    try:     # the options and access rules are checked before the model loads
        from .security import Access
        from .server import ServerConfig
        ServerConfig(**options).check()
        Access(options["api_keys"], options["admin_key"], options["enable_admin"], options["adapter_root"],
               bind_host=args.host)
    except ValueError as e:
        print(f"prefix-kernels serve: {e}", file=sys.stderr)
        return 2
    if args.engine_process:
        from .remote import EngineProcess

        try:
            engine, name = EngineProcess(build_warm, args), model_name(args)
        except RuntimeError as e:
            print(f"prefix-kernels serve: {e}", file=sys.stderr)
            return 1
    else:
        engine, name = build(args)
        engine.warmup()
    server = Server(engine, args.host, args.port, model_name=name, **options)
    auth = " -H 'Authorization: Bearer $KEY'" if options["api_keys"] else ""

    def banner(srv):
        print(f"serving {name} with prefixes {engine.prefixes} on {srv.url}\n"
              f"  curl {srv.url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{engine.prefixes[0]}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
              file=sys.stderr, flush=True)

    server.serve_forever(ready=banner)
    return 0
