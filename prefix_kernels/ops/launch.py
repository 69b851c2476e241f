"""Autotune once per launch key, then launch the chosen config's compiled kernel directly.

Shared by the fused op (prefix_attention.py) and the split path's kernels (split_attention.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
from triton.runtime import Heuristics

from .utils import autotune_enabled, env_get, head_dim_class, interpreting, warn_once

_INT32 = (-2**31, 2**31 - 1)
_TENSOR = torch.Tensor


def specialization_key(args) -> tuple:
    """What triton specializes a compiled kernel on, read from the launch arguments: per int
    whether it is 1 (a constexpr then), divisible by 16, and i32 or i64; per tensor its dtype
    and its address mod 16. A refinement of triton's own key (it also splits ints that triton
    does not specialize), so equal keys always mean the same compiled kernel. ~5 us for 51
    arguments (dev CPU), against ~23 us of Python in triton's JITFunction.run (3.9)."""
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            if a == 1:
                key.append(1)
            elif _INT32[0] <= a <= _INT32[1]:
                key.append(2 if a & 15 == 0 else 3)
            else:       # i64, or u64 from 2**63
                key.append((4 if a & 15 == 0 else 5) + (2 if a >= 2**63 else 0))
        elif kind is _TENSOR or kind is float or isinstance(a, _TENSOR):
            key.append(0 if kind is float else (a.dtype, a.data_ptr() & 15))
        elif kind is bool or a is None:
            key.append(a)
        else:           # anything else: its type and value (finer than triton, never coarser)
            key.append((kind, a))
    return tuple(key)


def direct_launch_enabled() -> bool:
    """PREFIX_KERNELS_DIRECT_LAUNCH=0 sends every launch through triton's JIT dispatch."""
    return env_get("PREFIX_KERNELS_DIRECT_LAUNCH", "1") != "0" and not interpreting()


class CompiledLaunches:
    """One JIT kernel at one set of constexprs and options: the compiled kernel triton chose for
    each argument specialization, launched without the JIT dispatch after the first launch.

    Triton's JITFunction.run binds and specializes every argument on each launch (~23 us of
    Python per launch at 51 arguments, dev CPU, triton 3.9); the fused op launches 4 kernels
    per layer forward+backward, which left GPT-2 small's training step host-bound: 29.9 ms of
    host time per step against PEFT's 27.1 (H100, 328706e); with direct launches that step runs
    1.09x PEFT's speed, 0.95-0.97x without (interleaved, results/probe_host_ab.json, 9346a32).
    The first launch of a
    specialization goes through triton (compiling or finding the kernel) and keeps what it
    returns; later ones call the compiled kernel's launcher with every argument in signature
    order (constexprs included: the launcher skips them), as JITFunction.run does.
    """

    disabled_reason: Optional[str] = None      # set once if this triton's launcher disagrees

    def __init__(self, jit_fn, kwargs: dict):
        self.jit, self.kwargs = jit_fn, kwargs
        params = getattr(jit_fn, "params", None)      # None: not a JITFunction (a test's stand-in)
        names = [p.name for p in params if p.is_constexpr] if params is not None else None
        self.tail = tuple(kwargs[n] for n in names) if names and all(n in kwargs for n in names) else None
        self.by_key: dict = {}
        # exact_key(args) -> compiled: a launch whose scalars equal an earlier one's skips
        # specialization_key (~3 us instead of ~7 at 53 arguments, dev CPU; the GPU hosts run
        # this Python ~3.5x slower). Bounded: dropout's seeds make every call's key new.
        self.by_exact: dict = {}
        self.leading_tensors = None

    def exact_key(self, args) -> Optional[tuple]:
        """The leading tensors' (dtype, address mod 16) and every other argument's value, or None
        where that is no key (tensors after a scalar, found at the first call; an unhashable
        argument). Every launcher passes one type per position, so equal values mean equal
        specializations (bool True and int 1 would collide: no launcher passes both at one
        position)."""
        n = self.leading_tensors
        if n is None:
            n = 0
            while n < len(args) and isinstance(args[n], _TENSOR):
                n += 1
            later = any(isinstance(a, _TENSOR) for a in args[n:])
            n = self.leading_tensors = -1 if later else n
        if n < 0:
            return None
        rest = args[n:]
        try:
            hash(rest)
        except TypeError:       # an unhashable argument: no exact key
            return None
        return tuple([(t.dtype, t.data_ptr() & 15) for t in args[:n]]), rest

    def launch(self, grid: tuple, args: tuple) -> None:
        grid = (*grid, 1, 1)[:3]        # the compiled kernel's launcher reads three dims
        if self.tail is None or CompiledLaunches.disabled_reason is not None:
            self.jit[grid](*args, **self.kwargs)
            return
        exact = self.exact_key(args)
        compiled = self.by_exact.get(exact) if exact is not None else None
        if compiled is None:
            key = specialization_key(args)
            compiled = self.by_key.get(key)
            if compiled is None:
                compiled = self.jit[grid](*args, **self.kwargs)
                if compiled is not None and len(args) + len(self.tail) == len(self.jit.params):
                    self.by_key[key] = compiled
                return
            if exact is not None:
                if len(self.by_exact) >= 64:
                    self.by_exact.clear()
                self.by_exact[exact] = compiled
        try:
            compiled[grid](*args, *self.tail)
        except TypeError as e:      # the launcher takes other arguments in this triton version
            CompiledLaunches.disabled_reason = str(e)
            warn_once(f"prefix_kernels: direct kernel launches are off for triton {triton.__version__} ({e}); "
                      "every launch goes through triton's JIT dispatch")
            self.jit[grid](*args, **self.kwargs)


def launch_direct(cache: dict, jit_fn, grid: tuple, args: tuple, kwargs: dict) -> None:
    """Launch jit_fn[grid](*args, **kwargs) through a CompiledLaunches kept in `cache` per
    (kernel, kwargs), or through triton's dispatch when direct launches are off."""
    if not direct_launch_enabled():
        jit_fn[grid](*args, **kwargs)
        return
    key = (jit_fn, tuple(kwargs.items()), args[0].get_device())     # compiled kernels are per device
    launches = cache.get(key)
    if launches is None:
        launches = cache[key] = CompiledLaunches(jit_fn, kwargs)
    launches.launch(grid, args)


def derived_constexprs(kernel, args, constexprs) -> dict:
    """The constexprs a @triton.heuristics kernel derives from its arguments (none for a plain
    @triton.jit one), so that a launch can pass them and skip the heuristics wrapper."""
    if not isinstance(kernel, Heuristics):
        return {}
    named = {**dict(zip(kernel.arg_names, args)), **constexprs}
    for name, rule in kernel.values.items():
        named[name] = rule(named)
    return {name: named[name] for name in kernel.values}


def _default_config_class(constexprs, dtype):
    return head_dim_class(constexprs["HEAD_DIM"])


class TunedLauncher:
    """Launches a family of kernels with the config autotune chose for each launch key.

    kernels: name -> @triton.jit kernel (or a @triton.heuristics one over it).
    candidates: name -> config class -> configs, the default first; PREFIX_KERNELS_AUTOTUNE=0
        (autotune_enabled) takes the default untimed.
    tune_keys: name -> the argument names triton's autotune key is built from.
    interpret_config: the only config under TRITON_INTERPRET=1.
    config_class: (constexprs, dtype) -> the key into candidates[name]; by default the
        head-dim class of constexprs["HEAD_DIM"].
    restore: name -> in-place outputs autotune must put back after each timed run.

    The first launch of a key goes through triton's Autotuner; later ones launch the chosen
    config directly: Autotuner.run cost ~70 us of host time per launch (H200 host, triton 3.6),
    which left the GPU idle at B16 S1024 D64 (1.06 ms host vs 0.6 ms GPU per forward+backward).
    The key holds everything the candidates and the heuristics read (constexprs, dtype), so the
    derived constexprs are computed once per key too.
    """

    def __init__(self, kernels: dict, candidates: dict, tune_keys: dict, interpret_config: triton.Config,
                 config_class: Optional[Callable] = None, restore: Optional[dict] = None):
        self.kernels = kernels
        self.candidates = candidates
        self.tune_keys = tune_keys
        self.interpret_config = interpret_config
        self.config_class = config_class or _default_config_class
        self.restore = restore or {}
        # what a chosen config launches: the JIT function under the heuristics wrapper
        self._jit = {name: kernel.fn if isinstance(kernel, Heuristics) else kernel for name, kernel in kernels.items()}
        self._tuners: dict = {}
        # (name, dtype, tune, seq bucket, *constexpr items) -> (config, derived constexprs)
        self.chosen: dict = {}
        # (name, launch key, device) -> CompiledLaunches of the chosen config
        self._compiled: dict = {}

    def _tuner(self, name: str, config_class, tune: bool):
        """The kernel wrapped in an autotuner over the candidates of one config class (the
        default alone without tuning), made once."""
        key = (name, config_class, tune)
        if key not in self._tuners:
            if interpreting():
                configs = [self.interpret_config]
            else:
                configs = self.candidates[name][config_class]
                configs = configs if tune else configs[:1]
            self._tuners[key] = triton.autotune(configs=configs, key=self.tune_keys[name],
                                                restore_value=self.restore.get(name))(self.kernels[name])
        return self._tuners[key]

    def launch(self, name, grid, args, constexprs, dtype, seq_bucket):
        tune = autotune_enabled()
        # the constexprs in the caller's order, unsorted (~1 us a launch): each call site builds
        # its dict in one order, and another order only keys the same choice twice
        key = (name, dtype, tune, seq_bucket, *constexprs.items())
        chosen = self.chosen.get(key)
        if chosen is None:
            tuner = self._tuner(name, self.config_class(constexprs, dtype), tune)
            tuner[grid](*args, **constexprs)
            self.chosen[key] = (tuner.best_config, derived_constexprs(self.kernels[name], args, constexprs))
            return
        if direct_launch_enabled():
            device = args[0].get_device()      # compiled kernels are per device
            launches = self._compiled.get((key, device))
            if launches is None:
                launches = CompiledLaunches(self._jit[name], self._kwargs(chosen, constexprs))
                self._compiled[(key, device)] = launches
            config = chosen[0]
            launches.launch(grid(config.kwargs) if callable(grid) else grid, args)
            return
        self._jit[name][grid](*args, **self._kwargs(chosen, constexprs))

    @staticmethod
    def _kwargs(chosen, constexprs) -> dict:
        config, derived = chosen
        return dict(**constexprs, **derived, **config.kwargs, num_warps=config.num_warps,
                    num_stages=config.num_stages)

    def chosen_configs(self):
        """(kernel name, dtype, tuned, seq bucket, constexprs, config) per launch key so far."""
        return [(key[0], key[1], key[2], key[3], dict(key[4:]), config)
                for key, (config, _) in self.chosen.items()]
