"""Prefix attention vs SDPA / PEFT's concat+mask / FlexAttention. Same as `prefix-kernels bench attention`."""
import sys

from prefix_kernels.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
