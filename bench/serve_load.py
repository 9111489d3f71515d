"""ccj-serve under load, on loopback: N concurrent clients send a fixed number of text queries;
queries/s and p50/p99 latency, next to the same encoder and index called in a loop without HTTP
(the overhead ratio), and the server's resident memory before and after the requests.

    python bench/serve_load.py --tiny --requests 10000 --clients 8        # memory: no growth over 10k
    python bench/serve_load.py --preset chinese-clip-vit-base-patch16 --requests 400 --clients 8

Builds a model of the preset's shapes with random weights (speed does not depend on the values),
embeds a folder of ``--images`` small images with ccj-embed (faiss index), starts ``python -m
chinese_clip_jax.serve`` on 127.0.0.1 at a free port, and sends ``GET /search?q=...&k=10`` from
``--clients`` threads over keep-alive connections (every query differs) until ``--requests`` are
answered or ``--budget-s`` passes. The direct loop is the service's own ``QueryEncoder`` and
index in this process, one query at a time (``direct x1``) and in batches of ``--max-batch``
(``direct xB``), run while the server is idle. A script, not a test: figures on a shared machine
are noisy; the load average is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(root: Path, n_images: int, preset: str | None) -> Path:
    """A saved random-weight model and ccj-embed's output (with a faiss index) over ``n_images``."""
    import jax
    import jax.numpy as jnp

    import chinese_clip_jax as ccj
    from chinese_clip_jax import embed

    if preset:
        cfg = ccj.ChineseCLIPConfig.preset(preset)
    else:  # the tests' tiny shapes with the real vocabulary
        sys.path.insert(0, str(ROOT / "tests"))
        from _train_helpers import tiny_config

        cfg = tiny_config(vocab_size=21128, max_positions=64, image_size=32, patch_size=8)
    model = ccj.ChineseCLIPModel(cfg)
    r = cfg.vision_config.image_size
    import flax.linen as nn

    shapes = nn.unbox(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 3, r, r)))["params"]
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape).astype(np.float32), shapes)
    ccj.save_pretrained(str(root / "model"), cfg, params)
    images = root / "images"
    images.mkdir()
    for i in range(n_images):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    out = root / "emb"
    opts = embed.EmbedOptions(batch_size=32, progress=False)
    model, params = ccj.from_pretrained(str(root / "model"))
    embed.embed_images(model, params, embed.open_images(str(images)), out, model_name=str(root / "model"), options=opts)
    embed.build_index(out, "images")
    return out


QUERY_WORDS = ["猫", "狗", "海边", "日落", "汽车", "面条", "雪山", "湖", "草地", "城市", "夜景", "花"]


def _query(i: int) -> str:
    a, b = QUERY_WORDS[i % len(QUERY_WORDS)], QUERY_WORDS[(i // len(QUERY_WORDS)) % len(QUERY_WORDS)]
    return f"{a}和{b}的照片{i}"


def _load(port: int, requests: int, clients: int, budget_s: float, offset: int) -> tuple[np.ndarray, float, int]:
    """(latencies in s, wall seconds, errors): ``clients`` threads share ``requests`` queries."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + budget_s

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            url = "/search?k=10&q=" + urllib.parse.quote(_query(offset + i))
            t0 = time.perf_counter()
            try:
                conn.request("GET", url)
                res = conn.getresponse()
                ok = res.status == 200 and bool(json.loads(res.read())["hits"])
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                ok = False
            mine.append(time.perf_counter() - t0)
            if not ok:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.asarray(latencies), time.perf_counter() - start, errors[0]


def _direct(out: Path, max_batch: int, n: int) -> tuple[float, float]:
    """Queries/s of the service's encoder + index without HTTP: one at a time, and in batches."""
    from chinese_clip_jax import serve

    service = serve.Service.load(out, options=serve.ServeOptions(max_batch=max_batch, warm_up=False))
    run, q = service.catalog.runs["images"], service.queries
    q.warm_up(images=False)  # the loop encodes texts only
    queries = [q.text_query(_query(10**6 + i)) for i in range(n)]
    try:
        t0 = time.perf_counter()
        for query in queries:
            run.search(q._encode_texts([query])[0], 10)
        one = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(0, n, max_batch):
            run.search(np.stack(q._encode_texts(queries[s : s + max_batch])), 10)
        batched = n / (time.perf_counter() - t0)
    finally:
        service.close()
    return one, batched


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", help="a model preset (default with --tiny: the tests' tiny shapes)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model")
    p.add_argument("--images", type=int, default=256, help="corpus size")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--budget-s", type=float, default=600, help="stop sending after this long")
    p.add_argument("--direct", type=int, default=200, help="queries of the direct (no HTTP) loop")
    args = p.parse_args(argv)
    if not args.tiny and not args.preset:
        p.error("give --preset NAME or --tiny")
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = _corpus(Path(tmp), args.images, None if args.tiny else args.preset)
        print(f"corpus: {args.images} images embedded in {time.perf_counter() - t0:.1f} s", flush=True)
        port = _free_port()
        cmd = [sys.executable, "-m", "chinese_clip_jax.serve", "--embeddings", str(out), "--port", str(port)]
        cmd += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        try:
            started = []
            while not (started and "listening on" in started[-1]):
                line = server.stderr.readline()
                if not line:
                    raise SystemExit("ccj-serve did not start:\n" + "".join(started))
                started.append(line)
            print("".join(started), end="", flush=True)
            threading.Thread(target=server.stderr.read, daemon=True).start()  # never let its pipe fill
            warm, _, _ = _load(port, 200, args.clients, args.budget_s, offset=0)  # connections, allocator
            rss_before = _rss_mib(server.pid)
            lat, wall, errors = _load(port, args.requests, args.clients, args.budget_s, offset=10**5)
            rss_after = _rss_mib(server.pid)
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read())
        finally:
            server.terminate()
            server.wait(timeout=60)
        one, batched = _direct(out, args.max_batch, args.direct)
    qps = len(lat) / wall
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import fastapi
    import uvicorn

    print(
        f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; python "
        f"{platform.python_version()}, jax {jax.__version__}, fastapi {fastapi.__version__}, uvicorn "
        f"{uvicorn.__version__}, backend {jax.default_backend()}"
    )
    batches = health["batches"]["text"]
    print(
        f"answered {len(lat)} of {args.requests} requests ({errors} errors) in {wall:.1f} s "
        f"from {args.clients} clients; "
        f"{batches} device calls over the whole run (warm-up 200 included): "
        f"{(len(lat) + len(warm)) / max(batches, 1):.1f} queries per call; compiles {health['compiles']}"
    )
    name = "tiny" if args.tiny else args.preset
    print(
        "| model | clients | requests | HTTP q/s | p50 ms | p99 ms | direct x1 q/s | direct xB q/s | "
        "HTTP / direct x1 | RSS before MiB | RSS after MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {name} | {args.clients} | {len(lat)} | {qps:.0f} | {1e3 * np.median(lat):.1f} | "
        f"{1e3 * np.percentile(lat, 99):.1f} | {one:.0f} | {batched:.0f} (B={args.max_batch}) | {qps / one:.2f} | "
        f"{rss_before:.0f} | {rss_after:.0f} |"
    )


if __name__ == "__main__":
    main()
