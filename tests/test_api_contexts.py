"""The Python API called where a notebook or a service calls it: inside a running event loop, from a worker
thread, with the caller's own Dask client current."""
import asyncio
import threading

import pytest

from tests.conftest import TINY_MODEL
from wdsembed.synthetic import write_demo_dataset

SETTINGS = dict(pretrained=False, device="cpu", num_threads_per_worker=1, fidelity_sample=0, batch_size=2)


@pytest.fixture
def demo(tmp_path):
    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=3, failed_per_shard=0)
    return str(tmp_path / "data")


def test_a_call_on_the_loop_of_the_current_asynchronous_client_is_refused_saying_how_to_call_it(demo, tmp_path):
    """With the caller's own `Client(asynchronous=True)` current (a notebook's `await Client(...)`), a call made
    on that client's event loop (a cell calling the embedder directly) failed deep in its worker check with
    "AttributeError: 'coroutine' object has no attribute 'items'" (the client answers coroutines there), having
    claimed the output; had it gone on, it would have blocked the very loop the client needs. It is refused before
    any work, saying to call it from a thread; called so, it embeds on that client's workers."""
    from distributed import LocalCluster, Client

    from wdsembed.api import TimmImageEmbedder

    embedder = TimmImageEmbedder(TINY_MODEL, **SETTINGS)
    out = tmp_path / "out"

    async def main():
        async with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                                asynchronous=True) as cluster, Client(cluster, asynchronous=True):
            with pytest.raises(RuntimeError, match=r"asyncio\.to_thread\(embedder") as refused:
                embedder(demo, str(out))
            assert not out.exists()  # refused before the output was claimed
            results = await asyncio.to_thread(embedder, demo, str(out))
            return refused.value, results

    refused, results = asyncio.run(main())
    assert "asynchronous" in str(refused)
    assert [(r.stem, r.embedded, r.cached) for r in results] == [("00000", 3, False)]


def test_calls_in_a_running_event_loop_and_a_worker_thread_embed_as_a_plain_call(demo, tmp_path):
    """A notebook cell (a running event loop), `asyncio.to_thread` and a service's worker thread (where no signal
    handler can be set) get the plain call's embeddings, and leave no thread of theirs behind but the model's
    stream, which the next call reuses (docs/nemo.md)."""
    import pyarrow.parquet as pq

    from wdsembed.api import TimmImageEmbedder

    embedder = TimmImageEmbedder(TINY_MODEL, **SETTINGS)

    def embeddings(name):
        return pq.read_table(tmp_path / name / "00000.parquet").column("image_embedding").to_pylist()

    embedder(demo, str(tmp_path / "plain"))
    before = set(threading.enumerate())

    async def main():
        embedder(demo, str(tmp_path / "in_loop"))
        await asyncio.to_thread(embedder, demo, str(tmp_path / "to_thread"))

    asyncio.run(main())
    thread = threading.Thread(target=embedder, args=(demo, str(tmp_path / "thread")))
    thread.start()
    thread.join()
    for name in ("in_loop", "to_thread", "thread"):
        assert embeddings(name) == embeddings("plain"), name
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left
