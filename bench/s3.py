"""S3 read throughput through a shaping proxy on loopback: the shard fetcher against the old ReadAhead and plain
parallel-range fetches, all in one run, rounds interleaved.

    python bench/s3.py                                    # writes docs/benchmarks/s3.json
    python bench/s3.py --size-mib 64 --rounds 2 --json -  # quicker, JSON to stdout

A folder-backed S3 server (tests/s3fast.py) and a proxy in front of it run in two child processes; the proxy adds a
first-byte latency per request and caps each TCP connection's bandwidth, as S3 does. For each proxy setting, every
round reads one object of --size-mib MiB with each variant, in turn:

- new:      wdsembed.s3fetch.ShardFetcher (defaults: memory budget 1.2 GB, sized by a 1 GB/s target), read
            through its file object in 8 MiB reads, as shards.iter_samples reads; a new fetcher each round, so
            it starts unmeasured (a worker's first shard);
- new_warm: the same, one fetcher kept across rounds (every later shard of a worker: it starts at the depth
            it learned);
- before:   wdsembed.prefetch.ReadAhead over s3fs with its defaults (8 MiB x 4), how shards were read before;
- plainN:   boto3, HEAD then N threads each GETting 8 MiB ranges into memory: the simplest fast fetch;
- s3fsN:    s3fs's _cat_file on its own event loop, N ranges in flight (client choice);
- fixedN:   the fetcher held at N in flight (4, 8, 16, 32): the scaling curve, against the model
            N x part / (first byte + part / per-connection rate);
- obstoreN: obstore's get_range_async, N in flight (client choice; with --obstore, where it is installed).

Clients are built before the clock starts (a worker builds them once); "new" makes a new fetcher each round, so it starts
unmeasured every time. Every variant's bytes are checked against the file once. Figures are medians over rounds,
and ratios are of medians. The machine's cores serve the proxy, the server and the client alike: on a small
machine the harness itself can be the limit, which shows as every variant topping out at the same rate.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

PART = 8 << 20
BUCKET, KEY = "bench", "shard.tar"


def _env() -> None:
    # the harness checks only which key signs; nothing real is used or needed
    os.environ.update(AWS_ACCESS_KEY_ID="AKIABENCHBENCHBENCH0", AWS_SECRET_ACCESS_KEY="bench-not-a-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)


# ---------------------------------------------------------------------------------------------------------------
# variants: each is prepare(endpoint) -> run() -> (bytes read, digest or None, extra facts)


def v_new(endpoint, size, check, **kwargs):
    from wdsembed import s3fetch

    fetcher = s3fetch.ShardFetcher({"endpoint_url": endpoint}, **kwargs)

    def run():
        h = hashlib.md5() if check else None
        n = 0
        try:
            with fetcher.open(f"s3://{BUCKET}/{KEY}") as f:
                while chunk := f.read(PART):
                    n += len(chunk)
                    if h:
                        h.update(chunk)
            snap = fetcher.snapshot()
        finally:
            fetcher.close()
        return n, h and h.hexdigest(), {"peak_bytes": snap["peak_bytes"], "budget": snap["budget"],
                                        "final_in_flight": snap["depth"],
                                        "in_flight_steps": [d for _, d in fetcher.depth_history]}

    return run


_WARM: dict = {}


def v_new_warm(endpoint, size, check):
    """One fetcher kept across rounds: each read is its next shard, starting from the in-flight depth it learned
    on the previous ones (what every shard after a worker's first sees). Its first, unmeasured round warms it."""
    from wdsembed import s3fetch

    fetcher = _WARM.get(endpoint)
    if fetcher is None:
        fetcher = _WARM[endpoint] = s3fetch.ShardFetcher({"endpoint_url": endpoint})

    def run():
        h = hashlib.md5() if check else None
        n = 0
        start_depth = fetcher.depth
        with fetcher.open(f"s3://{BUCKET}/{KEY}") as f:
            while chunk := f.read(PART):
                n += len(chunk)
                if h:
                    h.update(chunk)
        snap = fetcher.snapshot()
        return n, h and h.hexdigest(), {"peak_bytes": snap["peak_bytes"], "start_in_flight": start_depth,
                                        "final_in_flight": snap["depth"]}

    return run


def v_fixed(n_flight):
    """The fetcher held at n_flight requests in flight (no adaptation): the scaling curve."""
    def prepare(endpoint, size, check):
        return v_new(endpoint, size, check, initial_in_flight=n_flight, adaptive=False)

    return prepare


def v_before(endpoint, size, check):
    from wdsembed import prefetch, storage

    fs, _ = storage.filesystem(f"s3://{BUCKET}", {"endpoint_url": endpoint})
    fs.invalidate_cache()

    def run():
        h = hashlib.md5() if check else None
        n = 0
        with prefetch.ReadAhead(fs, f"{BUCKET}/{KEY}") as f:
            while chunk := f.read(PART):
                n += len(chunk)
                if h:
                    h.update(chunk)
        return n, h and h.hexdigest(), {}

    return run


def v_plain(n_flight):
    def prepare(endpoint, size, check):
        import boto3
        import botocore.config

        client = boto3.client("s3", endpoint_url=endpoint,
                              config=botocore.config.Config(max_pool_connections=n_flight))

        def one(start):
            return client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={start}-{start + PART - 1}")["Body"].read()

        def run():
            total = client.head_object(Bucket=BUCKET, Key=KEY)["ContentLength"]
            with ThreadPoolExecutor(n_flight) as pool:
                parts = list(pool.map(one, range(0, total, PART)))
            digest = None
            if check:
                h = hashlib.md5()
                for p in parts:
                    h.update(p)
                digest = h.hexdigest()
            return sum(map(len, parts)), digest, {}

        return run

    return prepare


def v_s3fs(n_flight):
    def prepare(endpoint, size, check):
        from fsspec.asyn import sync

        from wdsembed import storage

        fs, _ = storage.filesystem(f"s3://{BUCKET}", {"endpoint_url": endpoint,
                                                      "config_kwargs": {"max_pool_connections": n_flight}})
        sync(fs.loop, fs.set_session)

        async def fetch():
            total = (await fs._info(f"{BUCKET}/{KEY}", refresh=True))["size"]
            sem = asyncio.Semaphore(n_flight)

            async def one(start):
                async with sem:
                    return await fs._cat_file(f"{BUCKET}/{KEY}", start=start, end=min(start + PART, total))

            return await asyncio.gather(*[one(s) for s in range(0, total, PART)])

        def run():
            parts = sync(fs.loop, fetch)
            digest = hashlib.md5(b"".join(parts)).hexdigest() if check else None
            return sum(map(len, parts)), digest, {}

        return run

    return prepare


def v_obstore(n_flight):
    def prepare(endpoint, size, check):
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})

        async def fetch():
            total = (await obstore.head_async(store, KEY))["size"]
            sem = asyncio.Semaphore(n_flight)

            async def one(start):
                async with sem:
                    return await obstore.get_range_async(store, KEY, start=start, end=min(start + PART, total))

            return await asyncio.gather(*[one(s) for s in range(0, total, PART)])

        def run():
            parts = asyncio.run(fetch())
            digest = hashlib.md5(b"".join(bytes(p) for p in parts)).hexdigest() if check else None
            return sum(len(p) for p in parts), digest, {}

        return run

    return prepare


def _have_obstore() -> bool:
    try:
        import obstore
    except ImportError:
        return False
    return obstore is not None


# ---------------------------------------------------------------------------------------------------------------


def measure(endpoint, variants, size, rounds, expected_md5):
    """Median MB/s per variant over `rounds` interleaved rounds (plus a first, checked and unmeasured round)."""
    runs = {name: [] for name, _ in variants}
    facts = {name: {} for name, _ in variants}
    for r in range(rounds + 1):
        check = r == 0  # a warm-up round that also checks every variant's bytes
        for name, prepare in variants:
            run = prepare(endpoint, size, check)
            t0 = time.perf_counter()
            n, digest, extra = run()
            dt = time.perf_counter() - t0
            if n != size or (check and digest != expected_md5):
                raise SystemExit(f"{name}: read {n} bytes, digest {digest}: not the object")
            if not check:
                runs[name].append(n / dt / 1e6)
                for k, v in extra.items():
                    facts[name].setdefault(k, []).append(v)
    return {name: statistics.median(v) for name, v in runs.items()}, runs, facts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmarks", "s3.json"),
                   help="where to write the results ('-': stdout)")
    p.add_argument("--no-clients", action="store_true", help="skip the s3fs client-choice variant")
    p.add_argument("--obstore", action="store_true", help="add obstore variants (pip install '.[bench]')")
    p.add_argument("--no-sweep", action="store_true", help="skip the fetcher at fixed 4/8/16/32 in flight")
    a = p.parse_args(argv)
    _env()
    import s3fast

    size = a.size_mib << 20
    command = "python bench/s3.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    out = {"command": command.strip(), "object_mib": a.size_mib, "rounds": a.rounds, "cpus": os.cpu_count(),
           "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, BUCKET))
        path = os.path.join(tmp, BUCKET, KEY)
        h = hashlib.md5()
        with open(path, "wb") as f:
            for _ in range(a.size_mib):
                block = os.urandom(1 << 20)
                h.update(block)
                f.write(block)
        expected = h.hexdigest()
        server = s3fast.spawn_server(tmp, access_key=os.environ["AWS_ACCESS_KEY_ID"])
        try:
            settings = [
                ("fast", 0.05, 40e6, [("new", v_new), ("new_warm", v_new_warm), ("before", v_before),
                                      ("plain16", v_plain(16))]
                 + ([] if a.no_sweep else [(f"fixed{n}", v_fixed(n)) for n in (4, 8, 16, 32)])
                 + ([] if a.no_clients else [("s3fs16", v_s3fs(16))]
                    + ([("obstore16", v_obstore(16))] if a.obstore and _have_obstore() else []))),
                ("slow", 0.10, 20e6, [("new", v_new), ("new_warm", v_new_warm), ("plain32", v_plain(32))]
                 + ([] if a.no_clients else [("s3fs32", v_s3fs(32))]
                    + ([("obstore32", v_obstore(32))] if a.obstore and _have_obstore() else []))),
            ]
            for label, first_byte, rate, variants in settings:
                proxy = s3fast.spawn_proxy(server.endpoint, first_byte=first_byte, rate=rate)
                try:
                    med, runs, facts = measure(proxy.endpoint, variants, size, a.rounds, expected)
                finally:
                    proxy.stop()
                part_time = first_byte + PART / rate  # one request's time, unloaded
                out[label] = {"first_byte_s": first_byte, "per_connection_mb_s": rate / 1e6,
                              "model_mb_s_per_in_flight": round(PART / part_time / 1e6, 1),
                              "median_mb_s": {k: round(v, 1) for k, v in med.items()},
                              "runs_mb_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                              "new_reader": facts["new"], "new_reader_warm": facts["new_warm"]}
                print(f"{label} ({first_byte * 1000:.0f} ms first byte, {rate / 1e6:.0f} MB/s per connection): "
                      + ", ".join(f"{k} {v:.0f} MB/s" for k, v in med.items()), flush=True)
        finally:
            server.stop()
    fast, slow = out["fast"]["median_mb_s"], out["slow"]["median_mb_s"]
    out.update({
        "proxy_mb_s": fast["new"],
        "proxy_mb_s_before": fast["before"],
        "proxy_mb_s_plain16": fast["plain16"],
        "proxy_ratio_to_plain": round(fast["new"] / fast["plain16"], 3),
        "proxy_ratio_to_before": round(fast["new"] / fast["before"], 2),
        "slow_proxy_mb_s": slow["new"],
        "slow_proxy_mb_s_plain32": slow["plain32"],
        "slow_proxy_ratio_to_plain": round(slow["new"] / slow["plain32"], 3),
        "proxy_mb_s_warm": fast["new_warm"],
        "proxy_ratio_to_plain_warm": round(fast["new_warm"] / fast["plain16"], 3),
        "slow_proxy_mb_s_warm": slow["new_warm"],
        "slow_proxy_ratio_to_plain_warm": round(slow["new_warm"] / slow["plain32"], 3),
        "peak_bytes_max": max(out[k][r]["peak_bytes"][i] for k in ("fast", "slow")
                              for r in ("new_reader", "new_reader_warm") for i in range(a.rounds)),
        "memory_budget": out["fast"]["new_reader"]["budget"][0],
        "load_after": os.getloadavg(),
    })
    text = json.dumps(out, indent=1)
    if a.json == "-":
        print(text)
    else:
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            f.write(text + "\n")
        print(f"wrote {a.json}: new {out['proxy_mb_s']:.0f} MB/s, before {out['proxy_mb_s_before']:.0f}, "
              f"ratio to plain16 {out['proxy_ratio_to_plain']:.2f}; slow: ratio to plain32 "
              f"{out['slow_proxy_ratio_to_plain']:.2f}")
    return out


if __name__ == "__main__":
    main()
