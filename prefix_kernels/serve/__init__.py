"""Serving: the continuous-batching engines (decoder-only and encoder-decoder) and their
OpenAI-compatible HTTP server."""
from .engine import Engine, serve_engine
from .request import Completion, EngineClosed, PromptTooLong, QueueFull, Request, UnknownPrefix
from .sampling import SamplingParams
from .seq2seq_engine import Seq2SeqEngine
from .step import StepOptions
from .text import ByteTokenizer

__all__ = ["Engine", "Seq2SeqEngine", "serve_engine", "SamplingParams", "Request", "Completion", "ByteTokenizer",
           "UnknownPrefix", "PromptTooLong", "QueueFull", "EngineClosed", "StepOptions"]
