"""The HTTP server vs the engine alone, on loopback. Same as `prefix-kernels bench serve`."""
import sys

from prefix_kernels.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
