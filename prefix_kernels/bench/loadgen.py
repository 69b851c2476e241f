"""A load generator for OpenAI-compatible servers: concurrent streaming clients on asyncio/aiohttp.

    results = run(url, jobs, concurrency=32)                 # closed loop: 32 clients, back to back
    results = run(url, jobs, rate=8.0)                       # open loop: Poisson arrivals, 8 req/s
    python -m prefix_kernels.bench.loadgen < spec.json       # the same in a process of its own

Each job is an OpenAI request body (sent to /v1/completions, or /v1/chat/completions when it has
"messages"). Per request it records the status, the text, time to first token (first content
chunk), the gaps between content chunks, and the completion tokens the server reports
(`stream_options.include_usage`) or counts chunks without it. Imports nothing heavy (no torch),
so a separate process starts in well under a second and takes none of the server's GIL.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Result:
    index: int
    ok: bool = False
    status: int = 0
    error: str | None = None             # a connection error, a bad status, a stream without [DONE]
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    chunks: int = 0
    start: float = 0.0                   # time.perf_counter() when sent
    ttft: float | None = None            # seconds to the first content chunk
    latency: float = 0.0
    itl: list = field(default_factory=list)   # seconds between content chunks


async def _one(session, url: str, headers: dict, index: int, body: dict) -> Result:
    import aiohttp

    res = Result(index)
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    res.start = start = time.perf_counter()
    last = None
    try:
        async with session.post(url + path, json=body, headers=headers) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            if not body.get("stream"):
                out = await resp.json()
                choice = out["choices"][0]
                res.text = choice["message"]["content"] if chat else choice["text"]
                res.finish_reason = choice["finish_reason"]
                res.completion_tokens = out["usage"]["completion_tokens"]
                res.ok = True
                return res
            parts, done = [], False
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {event['error'].get('message')}"
                    continue
                if event.get("usage"):
                    res.completion_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices"):
                    continue
                choice = event["choices"][0]
                piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                if piece:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.chunks += 1
                    parts.append(piece)
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
            res.text = "".join(parts)
            if not done:
                res.error = res.error or "the stream ended without data: [DONE]"
            if not res.completion_tokens:
                res.completion_tokens = res.chunks
            res.ok = res.error is None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.latency = time.perf_counter() - start
    return res


async def run_async(url: str, jobs: list[dict], *, concurrency: int | None = None, rate: float | None = None,
                    api_key: str | None = None, seed: int = 0, timeout_s: float = 600.0) -> list[Result]:
    """Send every job: `concurrency` clients each taking the next job when its last one ends
    (closed loop), or arrivals at `rate` requests/s with exponential gaps (open loop)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    results: list[Result | None] = [None] * len(jobs)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if rate is None:
            queue = list(enumerate(jobs))[::-1]

            async def client():
                while queue:
                    i, body = queue.pop()
                    results[i] = await _one(session, url, headers, i, body)

            await asyncio.gather(*(client() for _ in range(max(1, concurrency or 1))))
        else:
            rng = random.Random(seed)
            tasks = []
            for i, body in enumerate(jobs):
                tasks.append(asyncio.ensure_future(_one(session, url, headers, i, body)))
                await asyncio.sleep(rng.expovariate(rate))
            for t in tasks:
                res = await t
                results[res.index] = res
    return results


def run(url: str, jobs: list[dict], **kwargs) -> list[Result]:
    """run_async in a fresh event loop (this thread)."""
    return asyncio.run(run_async(url, jobs, **kwargs))


def run_in_subprocess(url: str, jobs: list[dict], **kwargs) -> tuple[list[Result], float]:
    """run() in a child process, so the clients share no GIL with an in-process server.
    Returns the results and the wall seconds from the first request sent to the last answer."""
    import subprocess

    spec = json.dumps({"url": url, "jobs": jobs, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "prefix_kernels.bench.loadgen"], input=spec, capture_output=True,
                          text=True, timeout=kwargs.get("timeout_s", 600.0) + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    return [Result(**r) for r in out["results"]], out["wall_s"]


def wall_seconds(results: list[Result]) -> float:
    """From the first request sent to the last answer received."""
    return max(r.start + r.latency for r in results) - min(r.start for r in results)


def main() -> int:
    spec = json.loads(sys.stdin.read())
    results = run(spec["url"], spec["jobs"], **spec.get("kwargs", {}))
    json.dump({"results": [asdict(r) for r in results], "wall_s": wall_seconds(results)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
