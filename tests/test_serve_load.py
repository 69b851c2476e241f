"""A bounded load test: 64 concurrent streaming and non-streaming clients (aiohttp) on loopback.

Zero connection errors, and every answer equal to the same request sent alone (greedy), with
the batch full and requests queued behind it.
"""
import warnings

import pytest

from prefix_kernels.bench import loadgen
from serve_utils import NAMES, make_engine, request, start_server

CLIENTS = 64


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def test_64_concurrent_clients_get_their_solo_answers():
    srv = start_server(make_engine(max_batch=16, max_seq_len=64, queue_size=CLIENTS))
    try:
        jobs = []
        for i in range(CLIENTS):
            body = {"model": NAMES[i % len(NAMES)], "prompt": f"load test {i} " + "x" * (i % 7), "max_tokens": 6,
                    "temperature": 0, "ignore_eos": i % 3 == 0}
            if i % 2:
                body.update(stream=True, stream_options={"include_usage": True})
            if i % 5 == 0:
                body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
            jobs.append(body)
        solo = loadgen.run(srv.url, jobs, concurrency=1)
        assert all(r.ok for r in solo), [r.error for r in solo if not r.ok][:3]
        together = loadgen.run(srv.url, jobs, concurrency=CLIENTS)
        errors = [(r.index, r.error) for r in together if not r.ok]
        assert not errors, errors[:5]
        for alone, crowd in zip(solo, together):
            assert (crowd.text, crowd.finish_reason, crowd.completion_tokens) == \
                (alone.text, alone.finish_reason, alone.completion_tokens), jobs[alone.index]
        assert max(r.completion_tokens for r in together) == 6
        status, text, _ = request(srv, "GET", "/metrics")
        assert f'endpoint="completions",status="200"}} {CLIENTS * 2 * 4 // 5}' in text
    finally:
        srv.close()
