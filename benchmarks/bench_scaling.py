"""Prefix training on several GPUs: DDP 1 vs 2 GPUs, FSDP2 vs DDP. Same as `prefix-kernels bench scaling`."""
import sys

from prefix_kernels.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
