"""One training step of the TinyLlama-1.1B shape against PEFT, LoRA and full fine-tuning. Same as `prefix-kernels bench training`."""
import sys

from prefix_kernels.bench.training import main

if __name__ == "__main__":
    sys.exit(main())
