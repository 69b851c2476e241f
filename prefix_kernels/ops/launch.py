"""Autotune once per launch key, then launch the chosen config straight on the JIT function.

Shared by the fused op (prefix_attention.py) and the split path's kernels (split_attention.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import triton
from triton.runtime import Heuristics

from .utils import autotune_enabled, head_dim_class, interpreting


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
        # (name, dtype, tune, seq bucket, *sorted constexpr items) -> (config, derived constexprs)
        self.chosen: dict = {}

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
        key = (name, dtype, tune, seq_bucket, *sorted(constexprs.items()))
        chosen = self.chosen.get(key)
        if chosen is None:
            tuner = self._tuner(name, self.config_class(constexprs, dtype), tune)
            tuner[grid](*args, **constexprs)
            self.chosen[key] = (tuner.best_config, derived_constexprs(self.kernels[name], args, constexprs))
            return
        config, derived = chosen
        self._jit[name][grid](*args, **constexprs, **derived, **config.kwargs,
                              num_warps=config.num_warps, num_stages=config.num_stages)

    def chosen_configs(self):
        """(kernel name, dtype, tuned, seq bucket, constexprs, config) per launch key so far."""
        return [(key[0], key[1], key[2], key[3], dict(key[4:]), config)
                for key, (config, _) in self.chosen.items()]
