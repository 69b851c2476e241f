"""What every command line of the package shares: help that shows defaults, usage errors that are
one line (exit status 2), and checks of the paths a command names, made before any model loads."""
from __future__ import annotations

import argparse
import os
import re

# hub ids are "name" or "owner/name" of these characters; anything else can only be a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class UsageError(ValueError):
    """A command line that cannot work as given (a missing file, a malformed option): the CLI
    prints it as one line and exits with status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows each option's default, except where
    the default says nothing (None, False, an empty list) or the help already names it."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and not self._says_nothing(action.default):
            action.help = "default: %(default)s"      # an option without help still shows its default
        return super()._format_action(action)

    @staticmethod
    def _says_nothing(default) -> bool:
        return default is None or default is False or default == [] or default == argparse.SUPPRESS

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text or self._says_nothing(action.default):
            return text
        return super()._get_help_string(action)


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the package's help format; description: a docstring (all of it
    is shown, its line breaks kept)."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type when the message is empty, else the message's first line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_model_arg(value: str | None, flag: str = "--model") -> None:
    """A --model that is meant as a local folder must be one holding a config.json; a hub id
    ("name" or "owner/name") that is not a local folder is left to transformers to fetch."""
    if value is None:
        return
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{flag} {value}: the folder has no config.json (not a transformers model folder)")
        return
    if os.path.exists(path):
        raise UsageError(f"{flag} {value}: is a file; pass the model's folder")
    if not _HUB_ID.match(value) or value.startswith((".", "~")):
        raise UsageError(f"{flag} {value}: no such folder")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(value):
        raise UsageError(f"{flag} {value}: no such folder, and not in the Hugging Face cache (HF_HUB_OFFLINE=1)")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_file(path: str, flag: str) -> None:
    """An existing file; flag is how the command line named it ("--data ", "--task NAME=")."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "no such file"
        raise UsageError(f"{flag}{path}: {what}")


def check_adapter_dir(path: str, flag: str) -> None:
    """A prefix-tuning adapter folder (adapter_config.json inside); flag as in check_file."""
    if not os.path.isdir(path):
        raise UsageError(f"{flag}{path}: no such folder")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UsageError(f"{flag}{path}: no adapter_config.json in it (not a prefix-tuning adapter folder)")


def parse_named(pairs: list[str], flag: str) -> dict[str, str]:
    """NAME=VALUE options (repeatable) as a dict, names of [A-Za-z0-9._-] (1-64), each given once."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{flag} takes NAME=PATH, got {pair!r}")
        if not NAME_PATTERN.match(name):
            raise UsageError(f"{flag} {pair}: the name must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if name in out:
            raise UsageError(f"{flag} {name} is given twice")
        out[name] = value
    return out


def prefill_wait(text: str) -> "float | str":
    """--prefill-wait: seconds (>= 0) or 'auto' (Engine(prefill_wait=...))."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 or 'auto', got {text!r}")
    return value
