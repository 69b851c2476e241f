"""The decode kernel alone: CUDA vs Triton vs SDPA on concatenated KV. Same as `prefix-kernels bench decode-kernel`."""
import sys

from prefix_kernels.bench.decode_kernel import main

if __name__ == "__main__":
    sys.exit(main())
