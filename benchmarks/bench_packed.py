"""Training on mixed-length documents: packed sequences against padding (TinyLlama-1.1B shape)."""
import sys

from prefix_kernels.bench.packed import main

if __name__ == "__main__":
    sys.exit(main())
