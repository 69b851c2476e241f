"""Ask a running `prefix-kernels serve` for completions; the request's `model` picks the prefix.

    prefix-kernels serve --prefix sentiment=prefix-out/adapters/sentiment &     # the train demo's adapter
    python examples/serve_openai_client.py --model sentiment --prompt "review: a dull film. sentiment:"

Uses the `openai` package when it is installed, else plain urllib (same requests).
"""
from __future__ import annotations

import argparse
import json
import urllib.request


def complete(base_url: str, model: str, prompt: str, max_tokens: int, api_key: str) -> str:
    try:
        from openai import OpenAI
    except ImportError:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
        request = urllib.request.Request(f"{base_url}/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["choices"][0]["text"]
    client = OpenAI(base_url=base_url, api_key=api_key)
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def list_models(base_url: str, api_key: str) -> list[str]:
    request = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [m["id"] for m in json.load(response)["data"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="a prefix name (default: every one the server has)")
    parser.add_argument("--prompt", default="review: a dull, flat film. sentiment:")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    args = parser.parse_args(argv)
    names = [args.model] if args.model else list_models(args.base_url, args.api_key)
    for name in names:
        text = complete(args.base_url, name, args.prompt, args.max_tokens, args.api_key)
        print(f"{name}: {args.prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
