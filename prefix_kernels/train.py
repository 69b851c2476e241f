"""`prefix-kernels train`: prefix-tune a causal LM or an encoder-decoder LM (BART, Pegasus, ...) on
prompt/completion pairs, one prefix per task.

    prefix-kernels train --model PATH --data FILE.jsonl --prefix-len 32 --out DIR
    prefix-kernels train --model PATH --task support=support.jsonl --task legal=legal.jsonl --out DIR
    prefix-kernels train                  # the built-in demo on the CPU (tiny model, about a minute)
    prefix-kernels train --task a=a.jsonl --task b=b.jsonl     # your tasks on the demo model

Each JSONL line is {"prompt": str, "completion": str}; the loss covers the completion only. An
encoder-decoder model reads the prompt with its encoder and learns the completion as the
decoder's target (Li & Liang's summarization setting), with prefixes at the sites of --sites
(default: encoder, decoder and cross-attention).
Several tasks train in one run: each task is an entry of the prefix bank, each batch mixes the
tasks' rows, and every row trains its own task's prefix in one pass of the frozen model.

Written under --out:
  adapters/<task>/   a PEFT prefix-tuning adapter per task (`--data` is the task "default", the
                     demo's is "sentiment"), what `prefix-kernels serve --prefix <task>=DIR` takes;
                     each replaced whole (a new folder renamed into place)
  checkpoint.pt      resumed automatically (fsynced; the one before kept as checkpoint.prev.pt)
  log.jsonl          loss, learning rate, gradient norm, tokens/s per step; eval loss per task
  tb/                the same for TensorBoard, when the `tensorboard` package is installed
AdamW on the prefix, learning-rate warm-up then cosine or linear decay, gradient accumulation,
gradient clipping, weight decay.

Several devices: `--nproc N` relaunches this module under torchrun (or start it with torchrun /
accelerate launch yourself). Each rank takes a strided share of every global batch
(--batch-size rows per rank and micro-batch); the loss is the token mean over the whole global
batch, so N ranks train exactly what one process does on the same global batch. DDP or FSDP2
(--strategy), see prefix_kernels/distributed.py. Rank 0 alone writes checkpoints and adapters;
a checkpoint resumes under any number of ranks.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch

from . import distributed as pd
from .checkpoint import CHECKPOINT, load_for_resume, save_checkpoint, write_folder_atomically
from .cli_common import UsageError, check_file, check_model_arg, first_line, parse_named
from .cli_common import parser as cli_parser
from .train_data import (BatchPlan, Example, collate, collate_seq2seq, label_tokens, masked_row, read_jsonl,
                         split_eval, tokenize, tokenize_seq2seq)
from .train_log import SCHEDULES, RunLog, lr_factor, progress_bar

__all__ = ["add_arguments", "run", "main", "loss_sum", "evaluate", "read_jsonl", "CHECKPOINT"]


class _HFTokenizer:
    """The few things training needs of a transformers tokenizer (pad falls back to eos, then 0)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_special(self, text: str) -> list[int]:
        """With the model's special tokens (an encoder-decoder's source and target: BART's <s> ... </s>)."""
        return self.tok(text)["input_ids"]


def loss_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
             prefix_ids: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the next-token cross entropy over the labelled tokens (fp32), as HF's causal-LM
    loss before its mean: the caller divides by the token count of the whole (global) batch.
    prefix_ids: [B] bank entry per row (None: entry 0). An encoder-decoder model gets
    decoder_input_ids (the labels shifted right): ids are its source, labels its target, unshifted."""
    extra = {} if prefix_ids is None else {"prefix_ids": prefix_ids}
    if decoder_input_ids is not None:
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids, **extra).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                                 reduction="sum")
    logits = model(input_ids=ids, attention_mask=mask, **extra).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


class _Batches:
    """How the run's rows become a step's tensors and token count: decoder-only rows, or an
    encoder-decoder model's (source, target) rows when decoder_start_id is set."""

    def __init__(self, pad_id: int, decoder_start_id: int | None = None):
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id

    @property
    def seq2seq(self) -> bool:
        return self.decoder_start_id is not None

    def loss(self, model, rows: list[Example], device, with_prefix_ids: bool = True) -> torch.Tensor:
        """loss_sum of `rows` (prefix ids passed only when with_prefix_ids)."""
        if self.seq2seq:
            ids, mask, dec, labels, pids = (t.to(device) for t in collate_seq2seq(rows, self.pad_id,
                                                                                   self.decoder_start_id))
        else:
            (ids, mask, labels, pids), dec = (t.to(device) for t in collate(rows, self.pad_id)), None
        extra = {} if dec is None else {"decoder_input_ids": dec}
        return loss_sum(model, ids, mask, labels, pids if with_prefix_ids else None, **extra)

    def tokens(self, rows: list[Example]) -> int:
        return label_tokens(rows, self.seq2seq)


# -- the command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `prefix-kernels train` (also used to rebuild a command line for torchrun)."""
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help="local model folder or hub id (default: the demo model, a tiny Llama "
                      "with a byte tokenizer)")
    data.add_argument("--data", help="JSONL of {'prompt', 'completion'}: the task 'default'")
    data.add_argument("--task", action="append", metavar="NAME=FILE",
                      help="a task of its own prefix (repeat for several tasks trained in one run)")
    data.add_argument("--out", default="prefix-out",
                      help="output folder: adapters/<task>/, checkpoint.pt, log.jsonl, tb/")
    data.add_argument("--max-length", type=int, default=None, help="longest example in tokens "
                      "(default: the model's position limit less the prefix)")
    data.add_argument("--truncate", action="store_true", help="cut examples over the limit instead of refusing "
                      "them: a decoder-only prompt loses its start, an encoder-decoder source or target its end "
                      "(an end-of-sequence token kept)")
    data.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of each task")
    prefix = parser.add_argument_group("prefix")
    prefix.add_argument("--prefix-len", type=int, default=None, help="prefix slots P (default 32; demo 16)")
    prefix.add_argument("--projection-hidden", type=int, default=None, help="MLP reparameterization size")
    prefix.add_argument("--sites", default=None, help="encoder-decoder models: the prefixed attention, a comma list "
                        "of encoder, decoder, cross (default: all three, as in Li & Liang; 'decoder' is PEFT's)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1 epoch; demo 300)")
    optim.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch and process")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 5e-3; demo 5e-2)")
    optim.add_argument("--lr-schedule", default="linear", choices=SCHEDULES, help="decay after the warm-up")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    run_ = parser.add_argument_group("run")
    run_.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    run_.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (0: before and after)")
    run_.add_argument("--log-every", type=int, default=1, help="a log.jsonl line every N steps")
    run_.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint, start over")
    run_.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs")
    run_.add_argument("--seed", type=int, default=0)
    run_.add_argument("--quiet", action="store_true", help="no progress bar")
    dev = parser.add_argument_group("devices")
    dev.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    dev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    dev.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    dev.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to train on; > 1 relaunches "
                     "under torchrun")
    dev.add_argument("--strategy", default="auto", choices=pd.STRATEGIES,
                     help="several processes: DDP (the base replicated) or FSDP2 (the base sharded); "
                          "auto = DDP when the frozen weights fit one GPU")
    return parser


def _tasks(args) -> dict[str, str]:
    """{task name: JSONL path} of the command line, every file checked (UsageError)."""
    tasks = parse_named(args.task or [], "--task")
    if args.data is not None:
        if "default" in tasks:
            raise UsageError("--data is the task 'default', and --task default=... is given too")
        tasks = {"default": args.data, **tasks}
    for name, path in tasks.items():
        check_file(path, "--data " if name == "default" and path == args.data else f"--task {name}=")
    return tasks


def _check(args) -> dict[str, str]:
    """Everything on the command line that can be checked before a model loads."""
    check_model_arg(args.model)
    tasks = _tasks(args)
    if args.model is not None and not tasks:
        raise UsageError("--model needs --data FILE or --task NAME=FILE (no --model: the demo model)")
    for flag in ("nproc", "batch_size", "grad_accum", "save_every", "log_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a file, not a folder")
    return tasks


def run(args: argparse.Namespace) -> dict:
    """Train; returns {'train_losses' (every step, resumed ones included), 'eval_loss_before',
    'eval_loss' (token means over every task), 'eval_losses' ({task: loss}), 'adapters'
    ({task: folder}), 'steps'}.

    With --nproc N > 1 outside a launcher this relaunches under torchrun and returns what the
    ranks left in the checkpoint (the eval losses are printed by rank 0 and returned as None)."""
    tasks = _check(args)
    if args.nproc > 1 and not pd.under_launcher():
        return _launch(args)
    ctx = pd.setup(args.device, default_cuda=args.model is not None)
    try:
        result = _train(args, tasks, ctx)
    except BaseException:
        pd.teardown(ctx, failed=True)
        raise
    pd.teardown(ctx)      # after _train's frame (and the wrapper in it) is gone
    return result


def _launch(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() and args.model is not None else "cpu")
    if torch.device(device).type == "cuda" and args.nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {args.nproc} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    pd.launch(args.nproc, "prefix_kernels.train", _to_argv(args, drop=("nproc",)))
    ckpt = torch.load(os.path.join(args.out, CHECKPOINT), map_location="cpu", weights_only=False)
    names = ckpt.get("identity", {}).get("tasks", [])
    return {"train_losses": ckpt["losses"], "eval_loss_before": None, "eval_loss": None, "eval_losses": None,
            "adapters": {n: os.path.join(args.out, "adapters", n) for n in names}, "steps": ckpt["step"]}


def _to_argv(args, drop=()) -> list[str]:
    """The command line that gives `args` back (options left at their defaults omitted)."""
    argv = []
    for action in add_arguments(argparse.ArgumentParser())._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[0])
        elif isinstance(value, list):
            for item in value:
                argv += [action.option_strings[0], str(item)]
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


# -- the loop -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_sets: dict[str, list[Example]], batch_size: int, pad_id: int,
             ctx: pd.Context, decoder_start_id: int | None = None) -> tuple[dict[str, float], float]:
    """({task: token-mean loss}, token-mean loss over every task), each rank taking its share of
    every global batch. decoder_start_id: the rows are an encoder-decoder model's."""
    batches = _Batches(pad_id, decoder_start_id)
    was_training = model.training
    model.eval()
    per_task, all_total, all_count = {}, 0.0, 0
    size = batch_size * ctx.world
    for name, examples in eval_sets.items():
        total, count = 0.0, 0
        for start in range(0, len(examples), size):
            rows = pd.shard(examples[start:start + size], ctx, masked_row)
            total += batches.loss(model, rows, ctx.device).item()
            count += batches.tokens(rows)
        total, count = pd.all_sum([total, count], ctx)
        per_task[name] = total / max(count, 1)
        all_total, all_count = all_total + total, all_count + count
    model.train(was_training)
    return per_task, all_total / max(all_count, 1)


def _load_model(args, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(args.model))
        seq2seq = getattr(AutoConfig.from_pretrained(args.model), "is_encoder_decoder", False)
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(args.model, dtype=dtype)
    except OSError as e:        # not found locally nor on the Hub, offline, no tokenizer files...
        raise UsageError(f"--model {args.model}: cannot load it ({first_line(e)[:200]})") from None
    return tokenizer, model


def _identity(args, model, bank, names, base) -> dict:
    """What a checkpoint must share with a run to resume it."""
    return {"prefix_len": bank.prefix_len, "projection_hidden": bank.projection_hidden, "tasks": list(names),
            "model": {"name": os.path.basename(os.path.normpath(base)), "model_type": model.config.model_type,
                      "vocab_size": getattr(model.config, "vocab_size", None), "num_layers": bank.num_layers,
                      "num_kv_heads": bank.num_kv_heads, "head_dim": bank.head_dim}}


def _train(args, tasks: dict[str, str], ctx: pd.Context) -> dict:
    import prefix_kernels as pk
    from .demo import DEMO_MODEL_NAME, DEMO_TASK, demo_examples, demo_model, demo_tokenizer

    note = lambda message: pd.print_main(ctx, message)       # noqa: E731
    demo, device = args.model is None, ctx.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)     # the same on every rank: the same bank init
    rows = {name: read_jsonl(path) for name, path in tasks.items()}      # before any model loads
    if demo:      # the demo model (the serve demo serves its adapters), on its task or the given ones
        rows, base = rows or {DEMO_TASK: demo_examples()}, DEMO_MODEL_NAME
        tokenizer, model = demo_tokenizer(), demo_model()
        prefix_len, lr, steps = args.prefix_len or 16, args.lr or 5e-2, args.steps or (None if tasks else 300)
    else:
        base = args.model
        tokenizer, model = _load_model(args, dtype)
        prefix_len, lr, steps = args.prefix_len or 32, args.lr or 5e-3, args.steps
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = list(rows)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    sites = _sites(args, model, seq2seq)
    model.to(dtype=dtype)
    # patched where it was loaded (the CPU); wrap() then moves it, or shards it onto the devices
    bank = pk.patch_model(model, prefix_len, projection_hidden=args.projection_hidden, backend=args.backend,
                          names=names, **({"sites": sites} if seq2seq else {}))
    step_model = pd.wrap(model, ctx, args.strategy)
    if ctx.distributed:
        note(f"{ctx.world} processes on {device.type}, strategy {ctx.strategy}")

    limit = getattr(model.config, "max_position_embeddings", None)
    batches = _Batches(pad_id, _decoder_start(model) if seq2seq else None)
    truncated: list[str] = []
    if seq2seq:       # the encoder's positions, and the decoder's after the prefix offset
        from .integrations.transformers import position_offset
        max_source = args.max_length or limit or 1024
        room = (limit or 1024) - position_offset(model)
        if room < 2:
            raise UsageError(f"{model.config.model_type} has {limit} decoder positions and its decoder's tokens start "
                             f"at {position_offset(model)} (the prefix length, PEFT's offset): no room for a target; "
                             "use a shorter --prefix-len")
        max_target = args.max_length or room
        make_examples = lambda rows_, source_, index_: tokenize_seq2seq(  # noqa: E731
            rows_, tokenizer, max_source, max_target, source_, index_, args.truncate, truncated)
    else:
        max_tokens = args.max_length or (limit - prefix_len if limit else 4096)
        make_examples = lambda rows_, source_, index_: tokenize(  # noqa: E731
            rows_, tokenizer, max_tokens, source_, index_, args.truncate, truncated)
    eval_sets, train_set = {}, []
    for index, name in enumerate(names):
        source = tasks.get(name, "demo")
        held, kept = split_eval(make_examples(rows[name], source, index), args.eval_fraction, args.seed)
        if not kept:
            raise UsageError(f"{source}: {len(rows[name])} example(s) leave nothing to train on after the "
                             "eval split")
        eval_sets[name] = held
        train_set += kept
    if len(names) > 1:       # every batch mixes the tasks
        random.Random(args.seed).shuffle(train_set)
    eval_sets = {name: held for name, held in eval_sets.items() if held}
    if truncated:
        note(f"--truncate: {len(truncated)} example(s) cut to the model's limit (first: {truncated[0]})")
    micro_rows = args.batch_size * ctx.world
    global_batch = micro_rows * args.grad_accum
    steps = steps or math.ceil(len(train_set) / global_batch)
    plan = BatchPlan(train_set, global_batch, args.seed)

    params = [p for p in bank.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    os.makedirs(args.out, exist_ok=True)
    identity = _identity(args, model, bank, names, base)
    start_step, losses = 0, []
    if not args.no_resume:
        shapes = {k: tuple(v.shape) for k, v in bank.state_dict().items()}
        found = load_for_resume(args.out, identity, shapes, map_location=device, note=note)
        if found is not None:
            ckpt, path = found
            bank.load_state_dict(ckpt["bank"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_step, losses = ckpt["step"], list(ckpt["losses"])
            if start_step >= steps:
                note(f"{path} is already at step {start_step} of {steps}: nothing left to train "
                     "(--steps N trains further, --no-resume starts over)")
            else:
                note(f"resuming from {path} at step {start_step} of {steps} (--no-resume starts over)")
            saved = ckpt.get("global_batch", global_batch)
            if saved != global_batch:
                note(f"warning: the checkpoint was trained with a global batch of {saved} rows, this run uses "
                     f"{global_batch} ({args.batch_size} x {ctx.world} processes x {args.grad_accum} micro-batches): "
                     "later steps see other batches than an uninterrupted run would")

    log = RunLog(args.out, enabled=ctx.main, tensorboard=not args.no_tensorboard, note=note)
    log.write(start_step, event="start", resumed=start_step > 0, steps=steps, tasks=names, global_batch=global_batch)
    todo = steps - start_step
    eval_before = (evaluate(model, eval_sets, args.batch_size, pad_id, ctx, batches.decoder_start_id)
                   if eval_sets and todo > 0 else None)
    if eval_before is not None:
        log.write(start_step, eval_loss=eval_before[0])
    model.train()
    bar = progress_bar(steps, start_step, enabled=not args.quiet and ctx.main, note=note)
    tokens, started, scale = 0, time.perf_counter(), pd.loss_scale(ctx)
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    for step in range(start_step, steps):
        batch = plan(step)
        count = max(batches.tokens(batch), 1)    # the global batch's, known to every rank without a collective
        local = 0.0
        for start in range(0, len(batch), micro_rows):
            mine = pd.shard(batch[start:start + micro_rows], ctx, masked_row)
            loss = batches.loss(step_model, mine, device, with_prefix_ids=len(names) > 1)
            (loss * (scale / count)).backward()
            local += loss.item()
        pd.sync_gradients(bank, ctx)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        step_lr = lr * lr_factor(step, steps, args.warmup_steps, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(pd.all_sum([local], ctx)[0] / count)
        tokens += sum(len(ex.ids) + (len(ex.labels) if seq2seq else 0) for ex in batch)
        tokens_per_s = tokens / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{step_lr:.2g}", tok_s=f"{tokens_per_s:.0f}")
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            log.write(step + 1, loss=losses[-1], lr=step_lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps and eval_sets:
            log.write(step + 1, eval_loss=evaluate(model, eval_sets, args.batch_size, pad_id, ctx,
                                                   batches.decoder_start_id)[0])
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            if ctx.main:
                save_checkpoint({"bank": bank.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                                 "losses": losses, "global_batch": global_batch, "world_size": ctx.world,
                                 "identity": identity}, args.out)
            pd.barrier(ctx)
    bar.close()

    eval_after = (evaluate(model, eval_sets, args.batch_size, pad_id, ctx, batches.decoder_start_id)
                  if eval_sets else None)
    if eval_after is not None:
        log.write(steps, eval_loss=eval_after[0])
    log.close()
    adapters = {name: os.path.join(args.out, "adapters", name) for name in names}
    if ctx.main:
        for name, folder in adapters.items():
            write_folder_atomically(folder, lambda tmp, name=name: bank.save_pretrained(
                tmp, names=[name], base_model_name_or_path=base))
    pd.barrier(ctx)
    _report(ctx, losses[start_step:], eval_before, eval_after, eval_sets, adapters, args, demo)
    return {"train_losses": losses, "eval_loss_before": eval_before[1] if eval_before else None,
            "eval_loss": eval_after[1] if eval_after else None,
            "eval_losses": eval_after[0] if eval_after else None, "adapters": adapters, "steps": steps}


def _sites(args, model, seq2seq: bool) -> tuple[str, ...] | None:
    """The prefixed sites of an encoder-decoder model from --sites (None: patch_model's default,
    all three); UsageError for --sites on a decoder-only model."""
    if not seq2seq:
        if args.sites is not None:
            raise UsageError(f"--sites is for encoder-decoder models; {model.config.model_type} is decoder-only "
                             "(its one site is its self-attention)")
        return None
    if args.sites is None:
        return None
    from .integrations.seq2seq import SITE_ORDER
    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    if not sites or any(s not in SITE_ORDER for s in sites) or len(set(sites)) != len(sites):
        raise UsageError(f"--sites takes a comma list of {', '.join(SITE_ORDER)}, got {args.sites!r}")
    return sites


def _decoder_start(model) -> int:
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise UsageError(f"{model.config.model_type}: the model has no decoder_start_token_id in its config")
    return int(start)


def _report(ctx, new_losses, before, after, eval_sets, adapters, args, demo) -> None:
    """What this run did (losses of the steps run now, not those of a resumed checkpoint)."""
    if new_losses:
        head, tail = new_losses[:10], new_losses[-10:]
        pd.print_main(ctx, f"train loss {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} over "
                           f"{len(new_losses)} steps")
    if after is not None:
        for name, loss in after[0].items():
            was = f"{before[0][name]:.3f} -> " if before else ""
            pd.print_main(ctx, f"eval loss {name}: {was}{loss:.3f} on {len(eval_sets[name])} held-out examples")
    model = "" if demo else f" --model {args.model}"
    prefixes = " ".join(f"--prefix {name}={folder}" for name, folder in adapters.items())
    pd.print_main(ctx, f"adapters saved under {os.path.join(args.out, 'adapters')}; serve them with:\n"
                       f"  prefix-kernels serve{model} {prefixes}")


def main(argv: list[str] | None = None) -> int:
    """`prefix-kernels train`: 0 on success, 2 for a command line or data that cannot work."""
    parser = add_arguments(cli_parser("prefix-kernels train", __doc__))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, pd.LaunchError) as e:     # UsageError and CheckpointError too
        print(f"prefix-kernels train: error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
