"""Serving: the continuous-batching Engine and its OpenAI-compatible HTTP server."""
from .engine import Engine
from .request import Completion, EngineClosed, PromptTooLong, QueueFull, Request, UnknownPrefix
from .sampling import SamplingParams
from .step import StepOptions
from .text import ByteTokenizer

__all__ = ["Engine", "SamplingParams", "Request", "Completion", "ByteTokenizer", "UnknownPrefix",
           "PromptTooLong", "QueueFull", "EngineClosed", "StepOptions"]
