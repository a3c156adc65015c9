"""The worker: out of GPU memory, a batch runs again in halves in the same process; calls from several threads
share one stream, each getting what it would get alone."""
from __future__ import annotations

import collections
import os
import threading
import time

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from wdsembed import model as model_module
from wdsembed.config import EmbedConfig
from wdsembed.synthetic import photo_images
from wdsembed.worker import Worker, take_unsaid


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    config = EmbedConfig(input=str(tmp_path_factory.mktemp("in")), output=str(tmp_path_factory.mktemp("out")),
                         model_name=TINY_MODEL, pretrained=False, device="cpu", batch_size=8,
                         num_threads_per_worker=1)
    return Worker(config)


def test_out_of_memory_splits_the_batch_and_keeps_every_image(worker, monkeypatch):
    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(8))]
    keys, expected, failures = worker.embed(iter(samples), autocast=True, normalize=True)
    assert keys == [k for k, _ in samples] and not failures

    real = model_module.embed_batch
    sizes = []

    def small_memory(loaded, images, **kw):  # a device that holds at most 3 images at once
        sizes.append(len(images))
        if len(images) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(loaded, images, **kw)

    monkeypatch.setattr(model_module, "embed_batch", small_memory)
    model_before = worker.loaded.model
    keys2, got, failures2 = worker.embed(iter(samples), autocast=True, normalize=True)
    assert keys2 == keys and not failures2
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # 8 fails, each half of 4 fails, the quarters run
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert worker.loaded.model is model_before  # nothing rebuilt or reloaded


def test_out_of_memory_on_one_image_is_raised(worker, monkeypatch):
    def no_memory(loaded, images, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model_module, "embed_batch", no_memory)
    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(2))]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        worker.embed(iter(samples), autocast=True, normalize=True)


# A CPU worker under an address-space limit (ulimit -v) that refuses its model a batch of 64 images but not 32: the
# limit found in the process itself (its headroom grown until the whole batch passes, the last one that refused it
# and passed its half kept), each shape's oneDNN kernels made before it (made under the limit, a refusal breaks
# them: worker.allocation_refused).
_HOST_MEMORY_REFUSED = """
import json, logging, re, resource, sys, threading
import numpy as np
import torch
torch.set_num_threads(1)
threading.stack_size(1 << 20)  # the stream's threads take little of the limited address space
from wdsembed.config import EmbedConfig
from wdsembed.model import embed_batch
from wdsembed.synthetic import photo_images
from wdsembed.worker import Worker, take_unsaid

N, tmp = 64, sys.argv[1]
worker = Worker(EmbedConfig(input=tmp, output=tmp, model_name=sys.argv[2], pretrained=False, device="cpu",
                            batch_size=N, num_threads_per_worker=1))
samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(N, short_sides=(64, 96)))]
keys, expected, failures = worker.embed(iter(samples), autocast=True, normalize=True)
images = torch.randn(N, 3, *worker.recipe.input_size[1:])
for n in (N, N // 2):
    embed_batch(worker.loaded, images[:n], autocast=True, normalize=True)
base = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10

def passes(n):
    try:
        embed_batch(worker.loaded, images[:n], autocast=True, normalize=True)
        return True
    except RuntimeError as exc:
        assert "DefaultCPUAllocator" in str(exc), exc
        return False

found = None
for extra in range(0, 2048, 8):
    resource.setrlimit(resource.RLIMIT_AS, (base + (extra << 20), resource.RLIM_INFINITY))
    if passes(N):
        break
    if passes(N // 2):
        found = extra
warned = []
logging.getLogger("wdsembed").addHandler(
    type("Kept", (logging.Handler,), {"emit": lambda self, r: warned.append(r.getMessage())})())
resource.setrlimit(resource.RLIMIT_AS, (base + ((found or 0) << 20), resource.RLIM_INFINITY))
try:
    again, got, failures = worker.embed(iter(samples), autocast=True, normalize=True)
    outcome = {"same_keys": again == keys, "failures": failures,
               "close": bool(np.allclose(got, expected, rtol=1e-4, atol=1e-5))}
except RuntimeError as exc:
    outcome = {"raised": str(exc)}
print(json.dumps({"found": found, "warned": warned, **outcome}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's size from /proc")
def test_host_memory_refused_to_the_model_on_the_cpu_splits_the_batch(tmp_path):
    """On the CPU an allocation that fails (an address-space limit, ulimit -v; strict overcommit) raised torch's
    RuntimeError 'DefaultCPUAllocator: can't allocate memory' out of the batch, and the shard failed; the GPU's
    out-of-memory ran it again in halves. Now the host's refusal does too, in the same path: a real refusal, in a
    process of its own, every image embedded as without the limit."""
    import json
    import subprocess
    import sys

    script = tmp_path / "refused.py"
    script.write_text(_HOST_MEMORY_REFUSED)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "MALLOC_ARENA_MAX": "1"}  # one malloc arena: a thread's own would reserve 64 MiB of the limit
    done = subprocess.run([sys.executable, str(script), str(tmp_path), TINY_MODEL], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["found"] is not None, outcome  # a limit that refuses 64 images and not 32
    assert outcome == {"found": outcome["found"], "same_keys": True, "failures": {}, "close": True,
                       "warned": ["out of host memory on a batch of 64 images; running it as 32 + 32"]}


# --------------------------------------------------------------------------------------------------- the stream


def _calls(n_calls: int, per_call: int, seed: int = 1) -> list[list[tuple[str, bytes]]]:
    images = photo_images(n_calls * per_call, seed=seed, short_sides=(64, 96))
    return [[(f"c{c}-{i}", images[c * per_call + i].data) for i in range(per_call)] for c in range(n_calls)]


def _embed_in_threads(worker, calls, make_samples=lambda i, call: iter(call), **kw) -> list:
    """Each call's embed() in a thread of its own, all at once; returns each call's outcome in order: its result
    (keys, embeddings, failures, batch sizes seen, timeline) or the exception it raised."""
    outcomes: list = [None] * len(calls)

    def run(i: int) -> None:
        sizes, timeline = [], {}
        try:
            keys, emb, failures = worker.embed(make_samples(i, calls[i]), autocast=True,
                                               normalize=kw.get("normalize", True), on_batch=sizes.append,
                                               timeline=timeline)
            outcomes[i] = (keys, emb, failures, sizes, timeline)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return outcomes


def test_calls_at_once_share_the_stream_and_each_gets_what_it_would_alone(worker):
    """Three shards' calls from three threads (as a GPU worker's Dask threads make them): each gets its own keys
    in order, the embeddings it gets alone (the same batches: 8, 8, 4 for 20 images), its own failures."""
    calls = _calls(3, 20)
    calls[1][5] = ("c1-bad", b"not an image at all")
    alone = [worker.embed(iter(c), autocast=True, normalize=True) for c in calls]
    outcomes = _embed_in_threads(worker, calls)
    for i, ((keys, emb, failures), (keys2, emb2, failures2, sizes, _)) in enumerate(zip(alone, outcomes)):
        assert keys2 == keys and failures2 == failures
        np.testing.assert_array_equal(emb2, emb)
        # progress counts every sample once; a sample refused before DALI is counted with whichever batch is next
        assert sum(sizes) == 20 and (i == 1 or sizes == [8, 8, 4])
    assert set(outcomes[1][2]) == {"c1-bad"} and "c1-bad" not in outcomes[1][0]


def test_the_next_call_is_fed_before_the_previous_one_is_done(worker):
    """The point of the stream: the next shard's samples enter it while the previous shard's last batch is still
    in the pipeline and the model, instead of after it drained."""
    calls = _calls(2, 12)

    def samples(i, call):
        for n, item in enumerate(call):
            if i == 0 and n == len(call) - 1:
                deadline = time.monotonic() + 60
                while not worker._pending and time.monotonic() < deadline:  # the second call is waiting
                    time.sleep(0.01)
            yield item

    outcomes = _embed_in_threads(worker, calls, make_samples=samples)
    first, second = (o[4] for o in outcomes)
    assert second["embed_start"] < first["embed_end"]
    assert [o[0] for o in outcomes] == [[k for k, _ in c] for c in calls]


@pytest.mark.parametrize("n, linger", [(12, 0.0), (0, 0.0), (64, 1.0)], ids=["ordinary", "empty", "reader-ends-late"])
def test_a_call_whose_samples_are_all_in_returns_while_the_next_calls_tar_is_still_on_its_way(worker, n, linger):
    """The next call's samples do not come (its shard's store stalls): the call before it still gets its last
    batches and returns, instead of waiting for the next call's first samples. Also a call with no image at all
    (an img2dataset shard whose every download failed), and one of 64 samples (a whole read-ahead chunk, whole
    batches of 8) whose reader takes a moment after the last of them to reach the end of its tar (on S3, the last
    part still on its way): its last batch is out before its reader is done."""
    images = [(f"a{i}", im.data) for i, im in enumerate(photo_images(n, seed=4, short_sides=(64,)))]
    later = [(f"b{i}", im.data) for i, im in enumerate(photo_images(2, seed=5, short_sides=(64,)))]
    started, first_done = threading.Event(), threading.Event()
    outcomes: dict = {}

    def samples():
        started.set()  # the stream has taken this call
        yield from images
        deadline = time.monotonic() + 60
        while not worker._pending and time.monotonic() < deadline:  # the next call is queued behind this one
            time.sleep(0.01)
        time.sleep(linger)

    def stalled_samples():
        outcomes["first returned meanwhile"] = first_done.wait(timeout=15)
        yield from later

    def first() -> None:
        outcomes["first"] = worker.embed(samples(), autocast=True, normalize=True)
        first_done.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(timeout=60)
    keys, _, failures = worker.embed(stalled_samples(), autocast=True, normalize=True)
    thread.join(timeout=60)
    assert keys == [k for k, _ in later] and not failures
    assert outcomes["first"][0] == [k for k, _ in images] and not outcomes["first"][2]
    assert outcomes["first returned meanwhile"] is True, "the call returned only after the next call's samples came"


def test_a_call_that_fails_fails_alone(worker):
    """One call's samples raise midway (an unreadable shard) and another's progress callback raises (a fault
    mid-shard): those two raise; the calls beside them finish whole, and the worker goes on."""
    calls = _calls(4, 10)

    def samples(i, call):
        for n, item in enumerate(call):
            if i == 1 and n == 6:
                raise OSError("the shard's store went away")
            yield item

    outcomes: list = [None] * 4

    def run(i):
        def on_batch(n):
            if i == 2:
                raise RuntimeError("injected fault after a batch")
        try:
            outcomes[i] = worker.embed(samples(i, calls[i]), autocast=True, normalize=True, on_batch=on_batch)
        except Exception as exc:  # noqa: BLE001
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert isinstance(outcomes[1], OSError) and "went away" in str(outcomes[1])
    assert isinstance(outcomes[2], RuntimeError)
    for i in (0, 3):
        keys, emb, failures = outcomes[i]
        assert keys == [k for k, _ in calls[i]] and emb.shape[0] == 10 and not failures
    keys, emb, _ = worker.embed(iter(calls[2]), autocast=True, normalize=True)
    assert keys == [k for k, _ in calls[2]]


def test_calls_with_other_options_wait_for_a_stream_of_their_own(worker):
    """A call that does not normalize, queued behind calls that do, is run in its own pass over the pipeline."""
    calls = _calls(3, 9)
    kinds = [True, False, True]
    outcomes: list = [None] * 3

    def run(i):
        outcomes[i] = worker.embed(iter(calls[i]), autocast=True, normalize=kinds[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, (keys, emb, _) in enumerate(outcomes):
        norms = np.linalg.norm(emb, axis=1)
        assert keys == [k for k, _ in calls[i]]
        assert np.allclose(norms, 1.0, atol=1e-5) == kinds[i]


def test_a_worker_says_what_it_runs_on_and_with(tmp_path):
    """A CPU-only run's log said nothing of the device, precision, batch or threads it chose: each Worker's
    description waits, once, for the task layer to say it in its run's log (take_unsaid)."""
    if torch.cuda.is_available():
        pytest.skip("device auto takes the GPU here")
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path), model_name=TINY_MODEL, pretrained=False,
                         device="auto", batch_size=4, num_threads_per_worker=3)
    take_unsaid()
    own = Worker(config)
    try:
        assert take_unsaid() == [f"worker on cpu (no GPU visible): {TINY_MODEL} in float32, channels_last, batches "
                                 f"of 4; torch on {torch.get_num_threads()} thread(s), DALI on 3 (--num-threads)"]
        assert take_unsaid() == []
    finally:
        own.close()


def test_close_finishes_the_waiting_calls_and_refuses_new_ones(tmp_path):
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path), model_name=TINY_MODEL, pretrained=False,
                         device="cpu", batch_size=4, num_threads_per_worker=1)
    own = Worker(config)
    calls = _calls(2, 6)
    outcomes: list = [None] * 2
    threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(i, own.embed(iter(calls[i]), autocast=True,
                                                                                          normalize=True)))
               for i in range(2)]
    accepted = threading.Semaphore(0)

    class Pending(collections.deque):  # the calls the Worker took in, as it takes them
        def append(self, job):
            super().append(job)
            accepted.release()

    own._pending = Pending()
    for t in threads:
        t.start()
    for _ in threads:  # both calls are waiting (a fixed sleep raced a busy machine: a call came after the close)
        assert accepted.acquire(timeout=300)
    own.close()
    for t in threads:
        t.join(timeout=300)
    assert [o[0] for o in outcomes] == [[k for k, _ in c] for c in calls]
    with pytest.raises(RuntimeError, match="closed"):
        own.embed(iter(calls[0]), autocast=True, normalize=True)


def test_a_long_lived_process_builds_a_new_worker_when_a_setting_read_at_build_time_changes(tmp_path, monkeypatch):
    from wdsembed.worker import BUILD_ENV, COPY_INPUTS_ENV, READ_AHEAD_ENV

    for name in BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path), model_name=TINY_MODEL, pretrained=False,
                         device="cpu", batch_size=4, num_threads_per_worker=1)
    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(3))]
    try:
        first = Worker.for_config(config)
        assert first.pipeline.copy_inputs
        monkeypatch.setenv(READ_AHEAD_ENV, "0")  # read per call: the same Worker goes on
        assert Worker.for_config(config) is first
        monkeypatch.setenv(COPY_INPUTS_ENV, "0")  # read as it is built: a new one, the old one closed
        second = Worker.for_config(config)
        assert second is not first and not second.pipeline.copy_inputs
        with pytest.raises(RuntimeError, match="closed"):
            first.embed(iter(samples), autocast=True, normalize=True)
        keys, _, failures = second.embed(iter(samples), autocast=True, normalize=True)
        assert keys == [k for k, _ in samples] and not failures
        assert Worker.for_config(config) is second
        monkeypatch.delenv(COPY_INPUTS_ENV)
        assert Worker.for_config(config).pipeline.copy_inputs
    finally:
        for worker in Worker._current.values():
            worker.close()
        Worker._current.clear()


def test_gpu_processes_ask_for_every_hardware_queue_and_the_allocators_settings_unless_the_user_chose(monkeypatch):
    import subprocess
    import sys

    from wdsembed.worker import DALI_MEMORY_SETTINGS, GPU_HARDWARE_QUEUES, set_gpu_process_environment

    names = ("CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF", *DALI_MEMORY_SETTINGS)
    child = [sys.executable, "-c", f"import os; print(*(os.environ.get(n) for n in {names!r}))"]

    def in_a_child():  # the GPU workers are processes started after it: CUDA and DALI read the variables there
        return subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()

    for name in names:  # set first, so that what set_gpu_process_environment writes is undone afterwards too
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    set_gpu_process_environment()
    # torch's segments grown in place: ViT-L/14's worker peaked 1 GiB lower at the same rate (docs/benchmarks.md)
    assert in_a_child() == [str(GPU_HARDWARE_QUEUES), "expandable_segments:True", "1", "None", "None"]
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own allocator settings
    monkeypatch.setenv("DALI_USE_CUDA_MALLOC_ASYNC", "0")  # DALI's own pool, as the user asked
    set_gpu_process_environment()
    assert in_a_child() == ["8", "max_split_size_mb:128", "0", "None", "None"]
    # DALI refuses cudaMallocAsync beside either of these: a user who set one gets DALI's own default for the rest
    for other, value in (("DALI_USE_VMM", "1"), ("DALI_USE_DEVICE_MEM_POOL", "0")):
        monkeypatch.delenv("DALI_USE_CUDA_MALLOC_ASYNC", raising=False)
        monkeypatch.setenv(other, value)
        set_gpu_process_environment()
        assert "DALI_USE_CUDA_MALLOC_ASYNC" not in os.environ
        monkeypatch.delenv(other)


def test_hw_decoder_load_is_the_default_unless_the_diagnostic_variable_says_otherwise(monkeypatch):
    from wdsembed.worker import HW_DECODER_LOAD, HW_DECODER_LOAD_ENV, hw_decoder_load

    monkeypatch.delenv(HW_DECODER_LOAD_ENV, raising=False)
    assert hw_decoder_load() == HW_DECODER_LOAD == 0.9
    monkeypatch.setenv(HW_DECODER_LOAD_ENV, "0.5")
    assert hw_decoder_load() == 0.5
    for bad in ("", "half", "1.5", "-0.1", "nan"):
        monkeypatch.setenv(HW_DECODER_LOAD_ENV, bad)
        with pytest.raises(ValueError, match=f"{HW_DECODER_LOAD_ENV}=.*from 0 to 1"):
            hw_decoder_load()


def test_gpu_prefetch_is_two_unless_the_diagnostic_variable_says_otherwise(monkeypatch):
    from wdsembed.worker import GPU_PREFETCH, GPU_PREFETCH_ENV, gpu_prefetch

    monkeypatch.delenv(GPU_PREFETCH_ENV, raising=False)
    assert gpu_prefetch() == GPU_PREFETCH == 2
    monkeypatch.setenv(GPU_PREFETCH_ENV, "4")
    assert gpu_prefetch() == 4
    for bad in ("0", "-1", "two", "2.5", ""):
        monkeypatch.setenv(GPU_PREFETCH_ENV, bad)
        with pytest.raises(ValueError, match=f"{GPU_PREFETCH_ENV}=.*positive integer"):
            gpu_prefetch()


def test_the_model_queue_holds_two_batches_unless_the_variable_sets_another_limit_or_none(monkeypatch):
    from wdsembed.worker import GPU_QUEUED_BATCHES, GPU_QUEUED_BATCHES_ENV, gpu_queued_batches

    monkeypatch.delenv(GPU_QUEUED_BATCHES_ENV, raising=False)
    assert gpu_queued_batches() == GPU_QUEUED_BATCHES == 2
    for value in ("0", "3", "12"):
        monkeypatch.setenv(GPU_QUEUED_BATCHES_ENV, value)
        assert gpu_queued_batches() == int(value)
    for bad in ("-1", "three", "2.5", ""):
        monkeypatch.setenv(GPU_QUEUED_BATCHES_ENV, bad)
        with pytest.raises(ValueError, match=f"{GPU_QUEUED_BATCHES_ENV}=.*0 or more"):
            gpu_queued_batches()


class _OrderedEvent:
    """A stand-in for a CUDA event (no GPU here) that logs when it is recorded and waited for, numbered in the order
    the events were made."""

    def __init__(self, log: list, numbers) -> None:
        self.log, self.n = log, next(numbers)

    def record(self, stream) -> None:
        self.log.append(("record", self.n))

    def synchronize(self) -> None:
        self.log.append(("wait", self.n))


def test_the_host_waits_for_the_oldest_batch_once_the_stream_holds_more_than_the_limit():
    import itertools

    from wdsembed.worker import QueueBound

    log: list = []
    numbers = itertools.count()
    bound = QueueBound(3, lambda: _OrderedEvent(log, numbers))
    for _ in range(6):
        bound.after_batch("stream")
    # Batches 0-2 queue freely; from the fourth on, each new batch waits for the one three places before it, and
    # an event waited for is recorded again behind a later batch: four events in all, none made per batch.
    assert log == [("record", 0), ("record", 1), ("record", 2),
                   ("record", 3), ("wait", 0), ("record", 0), ("wait", 1), ("record", 1), ("wait", 2)]

    log.clear()
    bound.limit = 1  # a smaller limit (a new pass of the stream) waits down to it at once
    bound.after_batch("stream")
    assert log == [("record", 2), ("wait", 3), ("wait", 0), ("wait", 1)]
    assert next(numbers) == 4

    log.clear()
    unbounded = QueueBound(0, lambda: _OrderedEvent(log, numbers))
    for _ in range(10):
        unbounded.after_batch("stream")
    assert log == []  # no limit: no event, no wait (the CPU path, and WDSEMBED_GPU_QUEUED_BATCHES=0)


class _ClockEvent:
    """A stand-in for a CUDA timing event (there is no GPU here): the moment, in ms, at which the stream reached it."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, other: "_ClockEvent") -> float:
        return other.ms - self.ms


def test_stream_meter_splits_busy_idle_and_the_wait_before_a_call():
    from wdsembed.worker import StreamMeter

    meter = StreamMeter()
    before = _ClockEvent(0.0)  # the previous call's last batch ended at 0 ms
    # three batches: 10-30 ms, 35-55 ms, 95-115 ms: 60 ms busy, 5 + 40 ms idle between them, 10 ms before the first
    edges = [(10, 30), (35, 55), (95, 115)]
    previous = before
    for a, b in edges:
        end = _ClockEvent(b)
        meter.batches.append((previous, _ClockEvent(a), end))
        previous = end
    assert meter.seconds() == {"model_busy_s": 0.06, "model_idle_s": 0.045, "model_longest_idle_s": 0.04,
                               "model_wait_before_s": 0.01}
    assert meter.seconds() == {}  # read once
    # the stream's first call ever has no previous batch, and nothing is timed on the CPU
    meter.batches.append((None, _ClockEvent(0), _ClockEvent(7)))
    assert meter.seconds()["model_wait_before_s"] is None
    assert meter.start(None) is None and meter.end(None, None, None) is None and meter.batches == []


def test_a_cpu_worker_reports_no_stream_times(worker):
    timeline = {}
    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(4))]
    worker.embed(iter(samples), autocast=True, normalize=True, timeline=timeline)
    assert {"embed_start", "embed_fed", "embed_end"} <= timeline.keys()
    assert not any(k.startswith("model_") for k in timeline)


def test_a_worker_keeps_the_long_lived_objects_out_of_full_collections(tmp_path):
    """Built, a Worker freezes what is alive (the libraries, the model): a full collection then walks only what
    the shards made. Closed, it gives them back to the collector."""
    import gc

    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model_name=TINY_MODEL,
                         pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)
    gc.unfreeze()
    built = Worker(config)
    try:
        assert gc.get_freeze_count() > 10_000  # torch alone is more than that
        assert len(gc.get_objects()) < gc.get_freeze_count()  # what a full pass walks is the minority
    finally:
        built.close()
    assert gc.get_freeze_count() == 0


def test_a_calls_tar_is_read_ahead_of_the_thread_that_feeds_dali(worker, monkeypatch):
    """The samples are read in a thread of their own (threads.read_ahead), and the embeddings are the same as
    when they are read in the feeding thread (WDSEMBED_READ_AHEAD=0, a diagnostic)."""
    from wdsembed.worker import READ_AHEAD_ENV

    (call,) = _calls(1, 20, seed=5)

    def reading(where: set):
        for key, data in call:
            where.add(threading.current_thread().name)
            yield key, data

    ahead, inline = set(), set()
    monkeypatch.delenv(READ_AHEAD_ENV, raising=False)
    keys, emb, failures = worker.embed(reading(ahead), autocast=True, normalize=True)
    monkeypatch.setenv(READ_AHEAD_ENV, "0")
    keys2, emb2, failures2 = worker.embed(reading(inline), autocast=True, normalize=True)
    assert ahead == {"wdsembed-reader"} and inline == {"wdsembed-producer"}
    assert keys == keys2 == [k for k, _ in call] and not failures and not failures2
    np.testing.assert_array_equal(emb, emb2)


def test_a_cancelled_call_stops_its_reader(worker):
    """A caller that stops waiting (its task was cancelled) stops the reading of its samples: the reader's thread
    ends and the source is closed, and the next call is served."""
    (call,) = _calls(1, 16, seed=6)
    closed = threading.Event()

    def endless():
        try:
            while True:
                for item in call:
                    yield item
        finally:
            closed.set()

    def stop_after_first_batch(n):
        raise KeyboardInterrupt  # as a cancelled task's thread sees it

    with pytest.raises(KeyboardInterrupt):
        worker.embed(endless(), autocast=True, normalize=True, on_batch=stop_after_first_batch)
    assert closed.wait(timeout=60)
    deadline = time.time() + 60
    while any(t.name == "wdsembed-reader" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "wdsembed-reader" for t in threading.enumerate())
    keys, _, _ = worker.embed(iter(call), autocast=True, normalize=True)
    assert keys == [k for k, _ in call]


def test_a_call_cancelled_before_its_turn_never_reads_its_samples(worker):
    """A call whose caller stopped waiting while it was still queued (its task was cancelled) is passed over: its
    shard is never opened (on S3, never downloaded again after process_shard forgot it), and the calls behind it
    are served."""
    from wdsembed.worker import _Job

    (call,) = _calls(1, 10, seed=8)
    opened = []

    def never_read():
        opened.append(True)
        yield from call

    worker.embed(iter(call[:1]), autocast=True, normalize=True)  # the stream's thread is up
    cancelled = _Job(never_read(), (True, True))
    cancelled.cancelled = True
    with worker._cv:
        worker._pending.append(cancelled)
    keys, _, failures = worker.embed(iter(call), autocast=True, normalize=True)
    assert keys == [k for k, _ in call] and not failures
    assert opened == []


def test_a_cancelled_calls_batches_still_in_the_stream_skip_the_model(worker, monkeypatch):
    """The batches of a call whose caller stopped waiting (its task cancelled, its Dask worker closing) still come
    out of DALI, and went through the model all the same: seconds of a CPU's time per batch after a Ctrl-C, the
    stream's thread inside torch as its worker process exited. None of them is run once the caller has left."""
    (call,) = _calls(1, 16, seed=9)
    real = model_module.embed_batch
    starts = []

    def counted(loaded, images, **kw):
        starts.append(time.monotonic())
        return real(loaded, images, **kw)

    monkeypatch.setattr(model_module, "embed_batch", counted)

    def endless():
        while True:
            yield from call

    def stop_after_first_batch(n):
        raise KeyboardInterrupt  # as a cancelled task's thread sees it

    with pytest.raises(KeyboardInterrupt):
        worker.embed(endless(), autocast=True, normalize=True, on_batch=stop_after_first_batch)
    left = time.monotonic()
    deadline = time.time() + 60
    # its batches in flight come out of DALI, and the stream's pass ends (its producer thread with it)
    while any(t.name == "wdsembed-producer" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "wdsembed-producer" for t in threading.enumerate())
    assert [t for t in starts if t > left] == []
    keys, _, _ = worker.embed(iter(call), autocast=True, normalize=True)  # the stream goes on
    assert keys == [k for k, _ in call]


_EXIT_WHILE_EMBEDDING = """
import atexit, json, sys, threading
from wdsembed.config import EmbedConfig
from wdsembed.synthetic import photo_images
from wdsembed.worker import Worker

# Registered before the Worker's own hook, so run after it (atexit runs the latest first): the threads left as the
# interpreter goes on to finalize.
atexit.register(lambda: print(json.dumps({"threads": sorted(t.name for t in threading.enumerate()
                                                             if t.name.startswith("wdsembed-")),
                                          "caller": said}), flush=True))
folder, model = sys.argv[1], sys.argv[2]
worker = Worker(EmbedConfig(input=folder, output=folder, model_name=model, pretrained=False, device="cpu",
                            batch_size=16, num_threads_per_worker=1))
images = [(f"k{i}", im.data) for i, im in enumerate(photo_images(32, seed=3))]
said, embedding = [], threading.Event()

def endless():
    while True:
        yield from images

def caller():  # a daemon thread, as a Dask worker's task threads are: the interpreter does not wait for it
    try:
        worker.embed(endless(), autocast=False, normalize=True, on_batch=lambda n: embedding.set())
    except BaseException as exc:
        said.append(str(exc))

threading.Thread(target=caller, daemon=True).start()
assert embedding.wait(300)
# the main thread ends with the stream mid-way through an endless shard, in torch or DALI most of the time
"""


def test_a_process_that_exits_while_its_stream_embeds_stops_the_stream_first(tmp_path):
    """A process that exits while its Worker's stream still runs (a Dask worker process closed by its nanny after a
    Ctrl-C, the stream still on the in-flight batches of the shard it had) stops the stream and waits for its
    threads before the interpreter finalizes: a daemon thread still inside torch or DALI then is ended by the
    finalizing interpreter as it takes the GIL back, an unwind through C++ frames that calls std::terminate
    ("terminate called without an active exception", SIGABRT, a core dump). A real process, model and pipeline;
    the caller, a daemon thread, is told why its call failed."""
    import json
    import subprocess
    import sys

    script = tmp_path / "exits.py"
    script.write_text(_EXIT_WHILE_EMBEDDING)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), TINY_MODEL], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    left = json.loads(done.stdout.strip().splitlines()[-1])
    assert left == {"threads": [], "caller": ["the embedding stream was stopped: this process is exiting"]}, left


def test_a_fixed_size_runner_takes_any_number_of_images():
    """The fidelity reference's graph takes batches of one size: fewer images are filled up, more are cut into
    batches, and only the images' own outputs come back, in order."""
    from wdsembed.worker import in_fixed_batches

    seen = []

    def run(batch):  # a per-row function, like a model in eval mode
        seen.append(len(batch))
        return batch.flatten(1).sum(1, keepdim=True) * 2

    for n in (1, 7, 8, 9, 17):
        seen.clear()
        images = torch.arange(n * 12, dtype=torch.float32).reshape(n, 3, 2, 2)
        out = in_fixed_batches(run, 8, images)
        assert torch.equal(out, images.flatten(1).sum(1, keepdim=True) * 2)
        assert seen == [8] * -(-n // 8)
    with pytest.raises(ValueError):
        in_fixed_batches(run, 8, torch.zeros(0, 3, 2, 2))


def test_a_leased_worker_is_not_closed_for_another_runs_settings_until_its_lease_ends(tmp_path):
    """Two runs on one Dask worker, with other settings: the second run's task waits for the first run's lease to
    end instead of closing its Worker mid-shard; then it gets a Worker of its own (one model at a time)."""
    import threading

    def config(**kw) -> EmbedConfig:
        return EmbedConfig(input=str(tmp_path), output=str(tmp_path), model_name=TINY_MODEL, pretrained=False,
                           device="cpu", batch_size=4, num_threads_per_worker=1, **kw)

    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(3))]
    other, got = threading.Event(), {}

    def other_run() -> None:
        other.set()
        with Worker.lease(config(max_image_pixels=1_000_000)) as worker:
            got["worker"] = worker
            got["keys"] = worker.embed(iter(samples), autocast=True, normalize=True)[0]

    try:
        with Worker.lease(config()) as mine:
            thread = threading.Thread(target=other_run)
            thread.start()
            other.wait()
            thread.join(timeout=2)
            assert thread.is_alive() and "worker" not in got  # waiting for this lease, not closing this Worker
            keys, _, failures = mine.embed(iter(samples), autocast=True, normalize=True)
            assert keys == [k for k, _ in samples] and not failures
        thread.join(timeout=300)
        assert got["keys"] == [k for k, _ in samples] and got["worker"] is not mine
        assert list(Worker._current.values()) == [got["worker"]]
        with pytest.raises(RuntimeError, match="closed"):  # the first run's Worker went once its lease ended
            mine.embed(iter(samples), autocast=True, normalize=True)
    finally:
        for worker in Worker._current.values():
            worker.close()
        Worker._current.clear()


# --------------------------------------------------------------------------------------------------- bad rows


def _gray_png(level: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (level, level, level)).save(buf, "PNG")
    return buf.getvalue()


def _zero_and_overflow_checkpoint(path) -> None:
    """TINY_MODEL's random weights, changed so that its pooled embedding is all zeros for a mid-gray image
    (128), infinite for a white one and ordinary for a light gray one (230). Up to its last block the network has
    no biases (conv, then batch norm at its initial statistics, ReLU, pooling), so an image of constant level v
    gives activations proportional to (v - 127.5): gray's are white's / 255, light's white's x 0.804. In the last
    block, the shortcut's batch norm takes a threshold, ReLU(s - s_max / 16): zero for gray only; the residual
    branch's first batch norm keeps each channel's part above 0.9 of white's maximum (zero for light and gray),
    which its second scales by 3e38 (positive weights between): white's overflow float32."""
    import timm

    model = timm.create_model(TINY_MODEL, pretrained=False).eval()
    block = model.layer4[0]
    seen = {}
    hooks = [block.downsample.register_forward_hook(lambda m, i, o: seen.update(s=o[0])),
             block.conv1.register_forward_hook(lambda m, i, o: seen.update(r=o[0]))]
    with torch.no_grad():
        model(torch.ones(1, 3, *model.pretrained_cfg["input_size"][1:]))  # white: every input value 1
    for hook in hooks:
        hook.remove()
    shortcut, branch = seen["s"].amax(dim=(1, 2)), seen["r"].amax(dim=(1, 2))
    assert float(branch.max()) > 0
    with torch.no_grad():
        block.downsample[2].running_mean.copy_(shortcut.max() / 16)
        block.bn1.running_mean.copy_(0.9 * branch.clamp(min=0))
        block.bn1.weight.copy_((branch > 0) * 1e6)
        block.conv2.weight.abs_()
        block.bn2.weight.fill_(3e38)
    torch.save(model.state_dict(), path)


@pytest.mark.parametrize("normalize, dtype", [(True, "float32"), (False, "float32"), (False, "float16")])
def test_an_all_zero_or_non_finite_embedding_costs_only_its_own_row(tmp_path, normalize, dtype):
    """A model that gives one image an all-zero embedding and another a non-finite one (real weights, from a
    checkpoint): each such row gets its reason, every other image of the shard is embedded, and the output is
    written and valid. All zeros cannot be L2-normalized (with normalize on); unnormalized, zeros are a value. The
    fidelity check (PIL and the float32 model) refuses the same images rather than comparing them."""
    from wdsembed import shard
    from wdsembed.plan import plan_run
    from wdsembed.synthetic import ShardSample, write_shard
    from wdsembed.validate import validate_output

    weights = tmp_path / "w.pth"
    _zero_and_overflow_checkpoint(weights)
    levels = {"000000000": 255, "000000001": 128, "000000002": 230, "000000003": 231}
    write_shard(tmp_path / "in", "00000", [ShardSample(_gray_png(v), ext="png", key=k) for k, v in levels.items()])
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name=TINY_MODEL,
                         pretrained=False, checkpoint=str(weights), device="cpu", batch_size=4,
                         num_threads_per_worker=1, normalize_embeddings=normalize, embedding_dtype=dtype,
                         fidelity_sample=4)
    (plan,), _ = plan_run(config)
    result = shard.process_shard(config, plan)
    import pyarrow.parquet as pq

    table = pq.read_table(plan.output).to_pydict()
    got = dict(zip(table["key"], zip(table["image_embedding"], table["embedding_error"])))
    non_finite = "embedding holds NaN or infinite values"
    zeros = "embedding is all zeros: cannot be L2-normalized"
    assert got["000000000"] == (None, non_finite)
    if normalize:
        assert got["000000001"] == (None, zeros)
    else:
        assert got["000000001"][1] is None and not any(got["000000001"][0])
    for key in ("000000002", "000000003"):
        vector, error = got[key]
        assert error is None and np.isfinite(vector).all() and np.any(vector)
        if normalize:
            assert abs(np.linalg.norm(vector) - 1) < 1e-3
    assert (result.embedded, result.failed) == (4 - 1 - normalize, 1 + normalize)
    assert dict(result.errors)["000000000"] == non_finite
    assert [(c["reason"], c["rows"], c["keys"]) for c in result.error_causes] == (
        [(non_finite, 1, ["000000000"])] + ([(zeros, 1, ["000000001"])] if normalize else []))  # said in the UI
    assert validate_output(config, plan.output, dim=result.dim, expected_rows=4,
                           expected_embedded=result.embedded).ok
    fidelity = result.fidelity
    assert set(fidelity["both_refused"]) == {"000000000"} | ({"000000001"} if normalize else set())
    assert set(fidelity["cosines"]) == {"000000002", "000000003"}


# --------------------------------------------------------------------------------------------------- precision


def _one_shard(tmp_path, **settings) -> EmbedConfig:
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    write_shard(tmp_path / "in", "00000", [ShardSample(encode_image(make_image(32, 24, seed=i), "png"), ext="png")
                                           for i in range(2)])
    return EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name=TINY_MODEL,
                       pretrained=False, batch_size=4, num_threads_per_worker=1, fidelity_sample=0, **settings)


def test_autocast_on_the_cpu_changes_nothing_so_it_recomputes_nothing(tmp_path):
    """The CPU runs float32 whatever autocast says: a re-run with --device cpu --no-autocast (or the reverse)
    finds the outputs finished. On a GPU (or where the device is not fixed) autocast decides the precision, and
    keys apart."""
    from wdsembed import shard
    from wdsembed.plan import plan_run

    config = _one_shard(tmp_path, device="cpu")
    (plan,), _ = plan_run(config)
    first = shard.process_shard(config, plan)
    assert not first.cached and first.model["precision"] == "float32"
    other = config.model_copy(update={"autocast": False})
    (plan,), finished = plan_run(other)
    assert set(finished) == {"00000"}
    assert shard.process_shard(other, plan).cached
    for device in ("auto", "cuda"):
        gpu = config.model_copy(update={"device": device})
        assert shard.cache_key(gpu, plan) != shard.cache_key(gpu.model_copy(update={"autocast": False}), plan)


def test_autocast_with_device_auto_on_a_host_without_a_gpu_recomputes_nothing(tmp_path):
    """Device auto where the run's workers see no GPU runs float32 on the CPU whatever autocast says, as device cpu
    does: a re-run that toggles autocast (or names device cpu) found the outputs made otherwise and recomputed every
    one of them. Where the workers see a GPU, autocast off computes float32 there, not the CPU's outputs' key:
    recomputed."""
    from wdsembed import shard
    from wdsembed.plan import nothing_to_compute, plan_run

    if torch.cuda.is_available():
        pytest.skip("device auto resolves to the CPU only where no GPU is visible")
    config = _one_shard(tmp_path, device="auto", autocast=False)
    (plan,), _ = plan_run(config)
    first = shard.process_shard(config, plan)
    assert not first.cached and first.model["precision"] == "float32" and first.model["device"] == "cpu"
    for other in ({"autocast": True}, {"device": "cpu"}, {"device": "cpu", "autocast": True}, {}):
        again = config.model_copy(update=other)
        assert nothing_to_compute(again), other
        (plan,), finished = plan_run(again)
        assert set(finished) == {"00000"}, other
        result = shard.process_shard(again, plan, first_attempt=True)
        assert result.cached and result.cache_key == first.cache_key, other
    # where the workers see a GPU, autocast off is float32 on the GPU: keyed apart from the CPU's outputs
    (plan,), finished = plan_run(config, gpus=1)
    assert finished == {}
    assert shard.cache_key(config, plan) != first.cache_key


def test_a_run_that_would_embed_in_another_precision_than_the_finished_outputs_is_refused(tmp_path):
    """Outputs made on the CPU (float32), resumed where a GPU is visible with autocast (bfloat16 weights): the
    finished ones would stay beside the new ones, two precisions in one OUTPUT. Refused at planning, naming them
    and both precisions; the same run on the CPU, or with --force, goes on."""
    from wdsembed import shard
    from wdsembed.inputs import InputError
    from wdsembed.plan import check_finished_precision, plan_run, run_precision

    config = _one_shard(tmp_path, device="cpu")
    (plan,), _ = plan_run(config)
    shard.process_shard(config, plan)
    resumed = config.model_copy(update={"device": "auto"})
    with pytest.raises(InputError, match=r"made in float32 on cpu \(00000\); .* in bfloat16 on a GPU") as refused:
        plan_run(resumed, gpus=1)
    assert "(--device (device=) cpu)" in str(refused.value) and "--force" in str(refused.value)
    _, finished = plan_run(resumed, gpus=0)
    assert set(finished) == {"00000"}  # the same key: autocast=True, as the CPU run's
    (plan,), finished = plan_run(resumed.model_copy(update={"force": True}), gpus=1)
    assert finished == {}  # all recomputed: one precision
    check_finished_precision(resumed, finished, gpus=0)  # auto on a host without a GPU: the CPU, float32
    check_finished_precision(resumed.model_copy(update={"autocast": False}), finished, gpus=1)
    assert [run_precision(config.model_copy(update=u), gpus) for u, gpus in [
        ({"device": "cpu"}, 1), ({"device": "auto"}, 0), ({"device": "auto"}, 2), ({"device": "cuda"}, 1),
        ({"device": "cuda", "autocast": False}, 1), ({"device": "auto", "dask_address": "tcp://h:8786"}, None),
        ({"device": "auto", "dask_address": "tcp://h:8786"}, 0),
        ({"device": "cuda", "dask_address": "tcp://h:8786"}, None),
    ]] == ["float32", "float32", "bfloat16", "bfloat16", "float32", None, "float32", "bfloat16"]


def test_a_resume_on_a_dask_schedulers_workers_in_another_precision_is_refused_too(tmp_path):
    """With --dask-address the precision check was skipped: run_precision said 'unknown' for any device but cpu, so
    a run on a scheduler's GPU workers kept outputs made on the CPU (float32) and embedded the rest in bfloat16, or
    the reverse, without a word. --device cuda decides the precision wherever the workers are; --device auto asks
    the scheduler's workers whether they see a GPU (this host's CPU-only worker here: float32)."""
    import json

    import pyarrow.parquet as pq
    from distributed import LocalCluster

    from wdsembed import shard
    from wdsembed.output import FOOTER_KEY
    from wdsembed.inputs import InputError
    from wdsembed.plan import plan_run

    config = _one_shard(tmp_path, device="cpu")
    (plan,), _ = plan_run(config)
    shard.process_shard(config, plan)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        on_cluster = config.model_copy(update={"dask_address": cluster.scheduler_address})
        with pytest.raises(InputError, match=r"made in float32 on cpu \(00000\); .* in bfloat16 on a GPU"):
            plan_run(on_cluster.model_copy(update={"device": "cuda"}))
        _, finished = plan_run(on_cluster.model_copy(update={"device": "auto"}))  # CPU workers: float32, as made
        assert set(finished) == {"00000"}
        # The same output as a GPU with autocast makes it (its footer says bfloat16 on cuda): auto on these CPU
        # workers would embed the others in float32.
        table = pq.read_table(plan.output)
        meta = json.loads(table.schema.metadata[FOOTER_KEY])
        meta["result"]["model"].update(precision="bfloat16", device="cuda:0")
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, FOOTER_KEY: json.dumps(meta)}),
                       plan.output)
        with pytest.raises(InputError, match=r"made in bfloat16 on cuda \(00000\); .* in float32 on the CPU"):
            plan_run(on_cluster.model_copy(update={"device": "auto"}))


def test_a_model_that_cannot_load_is_loaded_once_per_run_not_once_per_shard(tmp_path, monkeypatch):
    """A local-dir: model whose weights file is whole but another model's passes the planning's checks (the model
    is built there without its weights; the file's header is read, not its tensors) and fails as each worker loads
    it: every shard of the run built it again and failed with the same error, N loads for N shards (seconds each
    for a large model). The process's Worker remembers the failure for the run; the next run tries again (its
    weights may have been fixed meanwhile)."""
    import timm
    from timm.models import save_for_hf

    from wdsembed.api import run_shards
    from wdsembed.shard import ShardsFailed
    from wdsembed.synthetic import write_demo_dataset

    folder = tmp_path / "model"
    save_for_hf(timm.create_model(TINY_MODEL, pretrained=False), str(folder))
    (folder / "pytorch_model.bin").unlink(missing_ok=True)
    from safetensors.torch import save_file
    save_file(timm.create_model("test_vit.r160_in1k", pretrained=False).state_dict(), folder / "model.safetensors")
    write_demo_dataset(tmp_path / "in", n_shards=3, per_shard=2, failed_per_shard=0)
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name=f"local-dir:{folder}",
                         pretrained=True, device="cpu", batch_size=4, num_threads_per_worker=1)
    load_model = model_module.load_model
    loads = []

    def counted(*args, **kwargs):  # the workers' loads, not the planning's check (on the meta device)
        if kwargs.get("device") != "meta":
            loads.append(args)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(model_module, "load_model", counted)
    for run in (1, 2):
        with pytest.raises(ShardsFailed) as failed:
            run_shards(config)
        assert sorted(failed.value.failures) == ["00000", "00001", "00002"]
        reasons = set(failed.value.failures.values())
        assert len(reasons) == 1, reasons  # one cause, said alike for every shard
        reason = reasons.pop()
        assert reason.startswith("ModelLoadError: ") and f"local-dir:{folder}" in reason, reason
        assert "Missing key(s)" in reason, reason  # the loader's own cause
        assert len(loads) == run, loads  # once per run
