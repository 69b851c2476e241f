"""Encoder-decoder generation: Seq2SeqEngine against HF generate and PEFT. Same as `prefix-kernels bench seq2seq`."""
import sys

from prefix_kernels.bench.seq2seq import main

if __name__ == "__main__":
    sys.exit(main())
