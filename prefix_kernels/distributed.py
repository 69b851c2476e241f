"""Data-parallel prefix training on PyTorch's own engine: torchrun, DDP and FSDP2.

One process per device, started by torchrun (`launch` calls its API; `accelerate launch` sets
the same environment). Every rank holds the whole prefix bank (it is small: 1.4 MB in fp32 for
the TinyLlama shape at P=32) and the same optimizer state; only the frozen base differs:
  ddp   the base replicated; `DistributedDataParallel` all-reduces the gradients of the
        parameters that require them, i.e. only the bank's (the frozen weights are in no bucket;
        DDP broadcasts them once, from rank 0, when it wraps the model).
  fsdp  the base sharded with FSDP2 (`fully_shard` on each decoder layer, then the root with
        the bank as an ignored, replicated parameter); the bank's gradients are all-reduced here
        after backward (frozen weights are gathered for forward and backward, never reduced).
  none  one process: nothing to wrap.
Why DDP and not a bare all_reduce of the bank after backward (equally correct, the trainable part
being tiny): DDP is what users and tools expect under torchrun, it checks at start that every rank
has the same parameters and broadcasts rank 0's, and it needs no code of ours in the loop. Its
overlap of communication with backward buys nothing here (the bank's gradient is complete only at
the end of backward), and costs nothing either.
This module knows the model only through nn.Module and the patched model's `prefix_bank`.
"""
from __future__ import annotations

import gc
import inspect
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "ddp", "fsdp")
# auto picks FSDP2 when the frozen weights take more than this share of one GPU's memory: the
# rest is for activations (B8 S1024 of a 13B shape needs tens of GiB) and the CUDA context
FIT_FRACTION = 0.5


@dataclass
class Context:
    """Where this process stands: rank, world size, device, and the strategy once resolved."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def under_launcher() -> bool:
    """True inside a torchrun / accelerate process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None, default_cuda: bool = True) -> Context:
    """Join the process group when started by a launcher; pick the device by LOCAL_RANK.

    device: None (CUDA if available and `default_cuda`, else CPU), "cpu", "cuda" or "cuda:N"
    (under a launcher "cuda" means cuda:LOCAL_RANK). Backend: NCCL on CUDA, gloo on the CPU.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() and default_cuda else "cpu")
    if kind == "cuda":
        index = torch.device(device).index if device and world == 1 else None
        where = torch.device("cuda", local_rank if index is None else index)
        torch.cuda.set_device(where)
    else:
        where = torch.device(kind)
    ctx = Context(rank, world, local_rank, where)
    if world > 1 and not dist.is_initialized():
        if where.type == "cuda":
            dist.init_process_group("nccl", device_id=where)
        else:
            dist.init_process_group("gloo")
    return ctx


def teardown(ctx: Context, failed: bool = False) -> None:
    """Leave the process group, once the DDP/FSDP wrappers are out of scope.

    Garbage is collected and the ranks meet at a barrier first: a gloo group destroyed from a DDP
    reducer's destructor at interpreter exit (the GIL held) can wait forever on gloo's thread,
    itself waiting for the GIL to free a finished collective's tensors (seen with torch 2.13).
    After a failure the other ranks may be gone: no barrier."""
    if ctx.distributed and dist.is_initialized():
        gc.collect()
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


class LaunchError(RuntimeError):
    """Some of the processes started by `launch` failed."""


def launch(nproc: int, module: str, argv: list[str]) -> None:
    """Run `python -m module *argv` in `nproc` local processes through torchrun's own API.

    Raises LaunchError naming the failed ranks (their errors are on stderr above)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv])
    except ChildFailedError as e:
        ranks = sorted(e.failures)
        raise LaunchError(f"{len(ranks)} of {nproc} processes failed (ranks {ranks}); see their errors above") \
            from None


def frozen_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def resolve_strategy(strategy: str, model, ctx: Context) -> str:
    """'none' for one process; 'auto' is DDP when the frozen weights fit one device, else FSDP2."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not ctx.distributed:
        return "none"
    if strategy != "auto":
        return strategy
    if ctx.device.type != "cuda":
        return "ddp"
    capacity = torch.cuda.get_device_properties(ctx.device).total_memory
    return "ddp" if frozen_bytes(model) <= FIT_FRACTION * capacity else "fsdp"


def fsdp_api():
    """`fully_shard` (torch >= 2.6 public path; 2.4-2.5 under _composable) and init_device_mesh."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    return fully_shard, init_device_mesh


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes transformers never splits."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise NotImplementedError(f"{type(model).__name__}: no decoder layers found to shard "
                                  f"(_no_split_modules={sorted(names)}); use --strategy ddp")
    return layers


def shard_frozen_base(model, mesh) -> None:
    """FSDP2 over `mesh`: each decoder layer, then the root (embeddings, final norm, LM head).
    The bank is an ignored parameter: a plain tensor, replicated, left where it is. Each group is
    moved to the mesh's device as it is sharded, so a model loaded on the CPU never needs to fit
    one GPU whole."""
    fully_shard, _ = fsdp_api()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.prefix_bank.parameters()))


def wrap(model, ctx: Context, strategy: str = "auto"):
    """Prepare a patched model (the base frozen, `model.prefix_bank` trainable) for this strategy.

    The model may be on the CPU or on ctx.device; patch it before wrapping (the attention layers'
    links to the bank survive both wrappers). Returns the module to call for training steps
    (the DDP wrapper, or the model itself); sets ctx.strategy.
    """
    bank = model.prefix_bank
    ctx.strategy = resolve_strategy(strategy, model, ctx)
    if ctx.strategy == "fsdp":
        _, init_device_mesh = fsdp_api()
        shard_frozen_base(model, init_device_mesh(ctx.device.type, (ctx.world,)))
        bank.to(ctx.device)                         # ignored parameters are not moved by fully_shard
        return model
    model.to(ctx.device)
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False: the buffers (rotary tables) are built identically on every rank,
        # no need to send them every step. The bank is one tensor (five with the MLP) whose
        # gradient is complete only when backward reaches layer 0, so there is no overlap to tune.
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        no_sync = ({"forward_sync_buffers": False}       # torch >= 2.13's name for it
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=device_ids, **no_sync)
    return model


def loss_scale(ctx: Context) -> float:
    """Factor on each rank's (token-loss sum / global token count) before backward: DDP averages
    gradients over ranks, so it needs the world size back; FSDP's bank gradients are summed."""
    return float(ctx.world) if ctx.strategy == "ddp" else 1.0


def sync_gradients(bank, ctx: Context) -> None:
    """After backward: sum the bank's gradients over ranks where no wrapper does it (FSDP2)."""
    if ctx.strategy != "fsdp":
        return
    grads = [p.grad for p in bank.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])      # one collective for all bank tensors
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum a few numbers over ranks (a no-op in one process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, ctx: Context) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def shard(rows: list, ctx: Context, masked_row=None) -> list:
    """This rank's rows of a global batch: rows rank, rank+W, ... (a strided split).

    When the global batch has fewer rows than ranks, a rank with none gets `masked_row(rows[0])`,
    a row that adds no loss, so every rank still runs the same number of forward/backward passes
    (DDP and FSDP2 need that)."""
    mine = rows[ctx.rank::ctx.world]
    if not mine and masked_row is not None:
        mine = [masked_row(rows[0])]
    return mine


def print_main(ctx: Context, *args, **kwargs) -> None:
    if ctx.main:
        print(*args, file=kwargs.pop("file", sys.stderr), **kwargs)
