"""cuDNN's attention with a BOTTOM-RIGHT causal mask, through NVIDIA's cudnn-frontend Python
package (`pip install nvidia-cudnn-frontend`, optional: the "cudnn_fe" vendor of the split path).

Why: with the row's P prefix keys prepended to its own keys, prefix attention IS causal attention
aligned bottom-right (query i sits at key position P + i, sees keys 0..P+i: the whole prefix and
own keys 0..i). PyTorch's cuDNN op aligns its causal mask top-left, so it needs P padded query
rows (the "pad" mode's copies of q and dO); the frontend exposes cuDNN's own bottom-right
alignment, so the whole layer is one cuDNN call on the concatenated K/V, nothing padded. The
prefix then costs its share of the scores (P*S of S^2/2) at cuDNN's speed.

Contract as the other vendors' (ops/vendor_attention.py): forward (q, k, v) -> (o, lse) with lse
natural log [B, H, Sq, 1] fp32; backward (dO, q, k, v, o, lse) -> (dq, dk, dv), GQA native
(dK/dV summed over each group by cuDNN). Graphs are built once per shape, layout, dtype, scale
and device (~0.1-1 s each, cuDNN's heuristics), for at most MAX_GRAPHS signatures.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# call signatures (shapes, strides, dtype, scale, causal, device) given graphs: each costs a build
# (~0.1-1 s) and stays; a signature past these runs fused (variable-length batches make one per
# length: an LRU would rebuild forever where lengths cycle)
MAX_GRAPHS = 64
# cuDNN 9: the fused attention whose forward and backward take the bottom-right alignment (the
# frontend added it in 1.5); which shapes a backend runs, its graph build says (check_support).
# Known: a backward with s_kv not a multiple of 128 could fault under CUDA graph replay before
# 9.15.1 (frontend 1.16 notes); this path is not captured (training, eager prefill).
MIN_BACKEND = 90000


@functools.lru_cache(maxsize=None)
def _module():
    """The cudnn package, or None when it cannot be imported."""
    try:
        import cudnn
    except Exception:       # not installed, or its library failed to load
        return None
    return cudnn


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why the cuDNN frontend cannot run here, or None."""
    cudnn = _module()
    if cudnn is None:
        return ("the cuDNN frontend is not installed (pip install 'prefix-kernels[cudnn]', i.e. "
                "nvidia-cudnn-frontend)")
    try:
        version = int(cudnn.backend_version())
    except Exception as exc:
        return f"the cuDNN frontend could not load cuDNN ({type(exc).__name__}: {exc})"
    if version < MIN_BACKEND:
        return f"cuDNN {version} (bottom-right causal attention needs {MIN_BACKEND} or newer)"
    return None


_HANDLES: dict = {}         # device index -> [cuDNN handle, the stream it was last set to]


def _handle(device: torch.device):
    """The device's cuDNN handle, set to torch's current stream (cudnnSetStream only when it
    changed: it queries the driver on every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = _HANDLES.get(index)
    if entry is None:
        with torch.cuda.device(index):
            entry = _HANDLES[index] = [_module().create_handle(), None]
    stream = torch.cuda.current_stream(index).cuda_stream
    if entry[1] != stream:
        _module().set_stream(entry[0], stream)
        entry[1] = stream
    return entry[0]


class _Graph:
    """A built cuDNN graph: its input/output uids in call order and its workspace size."""

    def __init__(self, graph, uids, workspace):
        self.graph, self.uids, self.workspace = graph, uids, workspace

    def run(self, tensors, device):
        handle = _handle(device)
        workspace = torch.empty(self.workspace, device=device, dtype=torch.uint8) if self.workspace else None
        self.graph.execute({uid: t.data_ptr() for uid, t in zip(self.uids, tensors)},
                           workspace.data_ptr() if workspace is not None else 0, handle=handle)


class _Pair:
    """The forward and backward graphs of one call signature, built together so that a shape
    whose backward has no engine is refused before its forward runs."""

    def __init__(self, forward, backward):
        self.forward, self.backward = forward, backward


_GRAPHS: dict = {}          # call signature -> _Pair, or the reason cuDNN could not build it


def _io_type(dtype):
    cudnn = _module()
    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]


def _new_graph(dtype, device):
    cudnn = _module()
    return cudnn.pygraph(io_data_type=_io_type(dtype), intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT, handle=_handle(device))


def _tensor(graph, name, layout, data_type):
    shape, stride = layout
    return graph.tensor(name=name, dim=list(shape), stride=list(stride), data_type=data_type)


def _number(tensors) -> list:
    """Our own uids 1..n for the graph's inputs and outputs, in call order: the frontend leaves
    them 0 until it validates (1.26 read before validate()), and execute binds pointers by uid."""
    for uid, t in enumerate(tensors, start=1):
        t.set_uid(uid)
    return list(range(1, len(tensors) + 1))


def _mask_kwargs(causal):
    if not causal:
        return {}
    cudnn = _module()
    return dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0)


def _finish(graph):
    cudnn = _module()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph.get_workspace_size()


def layout(t: torch.Tensor) -> tuple:
    """(shape, strides) of a tensor: what a graph is built for."""
    return tuple(t.shape), t.stride()


def _like(shape_stride) -> tuple:
    """The layout torch.empty_like gives a tensor of this layout (a permutation of a dense one:
    the same strides; anything else: contiguous)."""
    shape, stride = shape_stride
    return layout(torch.empty_like(torch.empty_strided(shape, stride, device="meta")))


def _lse_layout(q_layout) -> tuple:
    b, h, s, _ = q_layout[0]
    return (b, h, s, 1), (h * s, s, 1, 1)


def _graphs(dtype, q, k, v, scale, causal, device):
    """The _Pair for this call signature (q, k, v: layouts), or the reason cuDNN cannot run it,
    cached either way. out, dq, dk, dv are empty_like(q, k, v) and dO is put in out's layout, so
    q, k, v's layouts fix every tensor of both graphs."""
    key = (dtype, q, k, v, scale, causal, device)
    found = _GRAPHS.get(key)
    if found is not None:
        return found
    if len(_GRAPHS) >= MAX_GRAPHS:
        return (f"more than {MAX_GRAPHS} shapes seen (a cuDNN graph each): new shapes run fused; pad or "
                "pack batches to fewer lengths")
    try:
        found = _Pair(_build_forward(dtype, q, k, v, scale, causal, device),
                      _build_backward(dtype, q, k, v, scale, causal, device))
    except Exception as exc:        # no engine for this shape: the caller says so and runs fused
        text = str(exc).strip()
        found = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
    _GRAPHS[key] = found
    return found


def _build_forward(dtype, q, k, v, scale, causal, device):
    cudnn = _module()
    io, fp32 = _io_type(dtype), cudnn.data_type.FLOAT
    g = _new_graph(dtype, device)
    tq, tk, tv = _tensor(g, "q", q, io), _tensor(g, "k", k, io), _tensor(g, "v", v, io)
    kwargs = dict(name="prefix_sdpa", attn_scale=scale, **_mask_kwargs(causal))
    try:
        to, tstats = g.sdpa(q=tq, k=tk, v=tv, generate_stats=True, **kwargs)
    except TypeError:       # frontends before generate_stats
        to, tstats = g.sdpa(q=tq, k=tk, v=tv, is_inference=False, **kwargs)
    for t, (shape, stride), data_type in ((to, _like(q), io), (tstats, _lse_layout(q), fp32)):
        t.set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(data_type)
    uids = _number((tq, tk, tv, to, tstats))
    return _Graph(g, uids, _finish(g))


def _build_backward(dtype, q, k, v, scale, causal, device):
    cudnn = _module()
    io, fp32 = _io_type(dtype), cudnn.data_type.FLOAT
    g = _new_graph(dtype, device)
    tq, tk, tv = _tensor(g, "q", q, io), _tensor(g, "k", k, io), _tensor(g, "v", v, io)
    to, tdo = _tensor(g, "o", _like(q), io), _tensor(g, "dO", _like(q), io)
    tstats = _tensor(g, "stats", _lse_layout(q), fp32)
    tdq, tdk, tdv = g.sdpa_backward(q=tq, k=tk, v=tv, o=to, dO=tdo, stats=tstats, attn_scale=scale,
                                    name="prefix_sdpa_backward", **_mask_kwargs(causal))
    for t, of in ((tdq, q), (tdk, k), (tdv, v)):
        shape, stride = _like(of)
        t.set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(io)
    uids = _number((tq, tk, tv, to, tdo, tstats, tdq, tdk, tdv))
    return _Graph(g, uids, _finish(g))


def graph_counts() -> dict:
    """How many call signatures got graphs, and the reasons the others were refused (benchmarks
    check with it that this path ran rather than the fused one it falls back to)."""
    refused = sorted({g for g in _GRAPHS.values() if isinstance(g, str)})
    return {"built": sum(not isinstance(g, str) for g in _GRAPHS.values()), "refused": refused}


def unsupported_reason(dtype, q, k, v, scale: float, causal: bool, device) -> Optional[str]:
    """Why cuDNN cannot run a call of these q, k, v layouts ((shape, strides) each) on `device`:
    no frontend, or no engine for the shape; else None. Builds and caches both graphs at the
    first call of a signature (~0.1-1 s)."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    graphs = _graphs(dtype, q, k, v, float(scale), bool(causal), device)
    return graphs if isinstance(graphs, str) else None


def _call_graphs(q, k, v, scale, causal):
    graphs = _graphs(q.dtype, layout(q), layout(k), layout(v), float(scale), bool(causal), q.device)
    if isinstance(graphs, str):
        raise RuntimeError(f"prefix_attention: cuDNN frontend: {graphs}")
    return graphs


def forward(q, k, v, scale, causal):
    """(o like q, lse [B, H, Sq, 1] fp32 natural log), causal aligned bottom-right."""
    graphs = _call_graphs(q, k, v, scale, causal)
    b, h, sq, _ = q.shape
    out, lse = torch.empty_like(q), torch.empty((b, h, sq, 1), device=q.device, dtype=torch.float32)
    graphs.forward.run((q, k, v, out, lse), q.device)
    return out, lse


def backward(do, q, k, v, out, lse, scale, causal):
    """dq, dk, dv (laid out as empty_like(q, k, v)) given out (laid out as forward returns it)
    and lse ([B, H, Sq] or [B, H, Sq, 1], natural log)."""
    graphs = _call_graphs(q, k, v, scale, causal)
    b, h, sq, _ = q.shape
    lse = lse.reshape(b, h, sq, 1)
    if lse.stride() != (h * sq, sq, 1, 1):
        lse = lse.contiguous()
    if do.stride() != out.stride():       # the graph reads dO laid out as O
        do = torch.empty_like(out).copy_(do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    graphs.backward.run((q, k, v, out, do, lse, dq, dk, dv), q.device)
    return dq, dk, dv
