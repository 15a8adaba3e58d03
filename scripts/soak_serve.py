"""A soak test of `--mode serve`: minutes of mixed traffic against a local server, then what it served
and how its memory moved.

    python scripts/soak_serve.py --minutes 10                      # a seeded tiny_10m (as bench_serve.py)
    python scripts/soak_serve.py --minutes 10 --checkpoint runs/tiny_10m/latest

The server runs as `python -m sakimi_next --mode serve` (the model in a process of its own) with a small
queue. `--clients` threads each pick, at random (seeded), one of: a streamed chat reply read to its end;
a whole completion; a stream cancelled after a few chunks; a request whose client hangs up before the
reply; a bad request (not JSON, a value out of range, a lone surrogate, a body over the limit), which
must get a 4xx; and now and then a burst of more requests than the server runs and queues, some of
which must get 429. It prints the requests served, the responses by status, p50/p99 latency of the
replies, and the resident memory (RSS) of the web and model processes after the warm-up and at the
end. It exits 1 on any 5xx, unexpected status or broken connection, or if a slot is left busy.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import ROOT, seeded_checkpoint, wait_ready  # noqa: E402

MAX_CONCURRENT, MAX_QUEUE, MAX_TOKENS = 4, 4, 48
PROMPTS = ["The for statement", "A class is", "Explain the with statement.", "import", "What does yield do?"]
BAD = [  # (body bytes, what it checks)
    (b"{not json", "not JSON"), (b'{"prompt": "x", "temperature": 7}', "out of range"),
    (b'{"prompt": "\\ud800"}', "a lone surrogate"), (b'{"prompt": "x", "seed": 18446744073709551616}', "a seed"),
    (b'{"prompt": "' + b"x" * 3_000_000 + b'"}', "a body over the limit"), (b'{"messages": "hi"}', "the wrong shape"),
]


class Tally:
    """What the clients saw, from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status: collections.Counter = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.problems: list[str] = []
        self.requests = 0

    def add(self, kind: str, status: int | str, seconds: float | None = None, problem: str | None = None) -> None:
        with self.lock:
            self.requests += 1
            self.status[status] += 1
            if seconds is not None:
                self.latency[kind].append(seconds)
            if problem:
                self.problems.append(f"{kind}: {problem}")


def stream(http, url: str, rng: random.Random, tally: Tally, cancel_after: int | None) -> None:
    body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": rng.randint(4, MAX_TOKENS),
            "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(2**32), "stream": True}
    kind = "cancelled stream" if cancel_after else "stream"
    t0, chunks, last = time.perf_counter(), 0, None
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return tally.add(kind, r.status_code, problem=None if r.status_code == 429 else r.text[:200])
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks, last = chunks + 1, line[6:]
                if cancel_after and chunks >= cancel_after:
                    return tally.add(kind, 200)  # leaving the block closes the stream mid-way
    ok = last == "[DONE]"
    tally.add(kind, 200, time.perf_counter() - t0, None if ok else f"the stream ended with {last!r}")


def whole(http, url: str, rng: random.Random, tally: Tally, kind: str = "whole") -> None:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, MAX_TOKENS), "temperature": 0}
    t0 = time.perf_counter()
    r = http.post(url + "/v1/completions", json=body)
    tally.add(kind, r.status_code, time.perf_counter() - t0 if r.status_code == 200 else None,
              None if r.status_code in (200, 429) else r.text[:200])  # 429: a burst filled the queue


def hang_up(url: str, rng: random.Random, tally: Tally) -> None:
    """A whole completion whose client closes the connection before the reply."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": rng.choice(PROMPTS), "max_tokens": MAX_TOKENS}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(rng.random() * 0.2)
    tally.add("hang-up", "hung up")


def bad(http, url: str, rng: random.Random, tally: Tally) -> None:
    body, what = rng.choice(BAD)
    r = http.post(url + rng.choice(["/v1/completions", "/v1/chat/completions"]), content=body,
                  headers={"content-type": "application/json"})
    try:
        shaped = set(r.json()["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        shaped = False
    ok = 400 <= r.status_code < 500 and shaped
    tally.add("bad", r.status_code, None, None if ok else f"{what}: {r.status_code} {r.text[:200]}")


def burst(url: str, rng: random.Random, tally: Tally) -> None:
    """More requests at once than the server runs and queues: each gets 200 or 429."""
    import httpx2 as httpx

    def one(seed):
        with httpx.Client(timeout=120) as http:
            whole(http, url, random.Random(seed), tally, "burst")

    threads = [threading.Thread(target=one, args=(rng.random(),)) for _ in range(MAX_CONCURRENT + MAX_QUEUE + 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def client(url: str, seed: int, until: float, tally: Tally) -> None:
    import httpx2 as httpx

    rng = random.Random(seed)
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < until:
            pick = rng.random()
            try:
                if pick < 0.3:
                    stream(http, url, rng, tally, None)
                elif pick < 0.55:
                    whole(http, url, rng, tally)
                elif pick < 0.7:
                    stream(http, url, rng, tally, cancel_after=rng.randint(1, 4))
                elif pick < 0.8:
                    hang_up(url, rng, tally)
                elif pick < 0.97:
                    bad(http, url, rng, tally)
                else:
                    burst(url, rng, tally)
            except (httpx.TransportError, OSError) as e:
                tally.add("connection", "broken", problem=f"{type(e).__name__}: {e}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_pids(server_pid: int) -> list[int]:
    """The model's processes (one per engine): the server's children spawned by multiprocessing (not its
    resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(server_pid):
                if b"multiprocessing.spawn" in (stat.parent / "cmdline").read_bytes() and \
                        b"resource_tracker" not in (stat.parent / "cmdline").read_bytes():
                    found.append(int(stat.parent.name))
        except OSError:
            continue
    if not found:
        raise SystemExit("the model's process was not found")
    return found


def traffic(url: str, clients: int, seconds: float, seed: int, tally: Tally) -> None:
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(url, seed * 1000 + i, until, tally)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def percentile(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs after the warm-up")
    p.add_argument("--warmup", type=float, default=None, help="seconds of traffic before the first memory reading "
                                                               "(default: 10%% of the run, at most 60)")
    p.add_argument("--checkpoint", default=None, help="model to serve (default: a seeded --preset)")
    p.add_argument("--preset", default="tiny_10m")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="the server's --threads")
    p.add_argument("--engines", type=int, default=1, help="the server's --engines (model processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8766)
    a = p.parse_args()
    seconds = a.minutes * 60
    warmup = a.warmup if a.warmup is not None else min(60.0, seconds / 10)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or str(seeded_checkpoint(Path(tmp), a.preset))
        url = f"http://127.0.0.1:{a.port}"
        cmd = [sys.executable, "-m", "sakimi_next", "--mode", "serve", "--resume-from", ckpt, "--port", str(a.port),
               "--device", "cpu", "--threads", str(a.threads), "--max-concurrent", str(MAX_CONCURRENT),
               "--max-queue", str(MAX_QUEUE), "--max-tokens", str(MAX_TOKENS), "--engines", str(a.engines)]
        log = Path(tmp) / "server.log"
        with open(log, "w") as server_log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stderr=server_log)
            try:
                wait_ready(url, proc)
                models = model_pids(proc.pid)
                traffic(url, a.clients, warmup, a.seed + 1, Tally())
                start = rss_mb(proc.pid), sum(map(rss_mb, models))
                tally = Tally()
                t0 = time.monotonic()
                traffic(url, a.clients, seconds, a.seed, tally)
                elapsed = time.monotonic() - t0
                health = idle_health(url)
                end = rss_mb(proc.pid), sum(map(rss_mb, models))
            finally:
                proc.terminate()
                proc.wait(timeout=120)
        server_stderr = log.read_text()
    return report(a.clients, warmup, tally, elapsed, start, end, health, proc.returncode, server_stderr, len(models))


def idle_health(url: str) -> dict:
    """/health once every slot is free (polled, bounded)."""
    import httpx2 as httpx

    for _ in range(600):
        health = httpx.get(url + "/health", timeout=30).json()
        if health["active"] == 0 and health["queued"] == 0:
            break
        time.sleep(0.1)
    return health


def report(clients: int, warmup: float, tally: Tally, elapsed: float, start, end, health: dict, exit_code: int,
           server_stderr: str, engines: int = 1) -> int:
    replies = [x for kind in ("stream", "whole") for x in tally.latency[kind]]
    print(f"soak: {elapsed / 60:.1f} minutes of traffic from {clients} clients (after {warmup:.0f} s of warm-up), "
          f"{tally.requests:,} requests; the server: {health['requests_served']:,} replies served in all, "
          f"{health['tokens_generated']:,} tokens")
    print("responses by status: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(tally.status.items(), key=str)))
    for kind in ("stream", "whole", "burst"):
        xs = tally.latency[kind]
        if xs:
            print(f"latency of {kind} replies ({len(xs):,}): p50 {percentile(xs, 50) * 1000:.0f} ms, "
                  f"p99 {percentile(xs, 99) * 1000:.0f} ms")
    print(f"RSS after the warm-up -> at the end: web process {start[0]:.1f} -> {end[0]:.1f} MB "
          f"({end[0] - start[0]:+.1f}), model process{'es' if engines > 1 else ''} {start[1]:.1f} -> {end[1]:.1f} MB "
          f"({end[1] - start[1]:+.1f})")
    traceback = "Traceback" in server_stderr
    print(f"server: exit code {exit_code} after SIGTERM; {'a' if traceback else 'no'} traceback in its log; "
          f"slots busy at the end: {health['active'] + health['queued']}")
    failures = tally.problems + [f"status {s}" for s in tally.status if isinstance(s, int) and s >= 500]
    if traceback or exit_code != 0 or health["active"] + health["queued"] or not replies:
        failures.append("the server misbehaved (see above)")
    for f in failures[:20]:
        print(f"problem: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
