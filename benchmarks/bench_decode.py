"""End-to-end generation: the serving engine against PEFT and HF generate. Same as `prefix-kernels bench decode`."""
import sys

from prefix_kernels.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
