"""The Python API, with the parameter names of NeMo Curator's TimmImageEmbedder.

    from wdsembed import TimmImageEmbedder
    embedder = TimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", batch_size=512)
    results = embedder("/data/shards", "/data/embeddings")        # one ShardResult per shard

or, as NeMo Curator code reads (wdsembed.nemo has get_client and ImageTextPairDataset):

    dataset = ImageTextPairDataset.from_webdataset("/data/shards", id_col="key")
    embedded = embedder(dataset)                                  # into /data/shards_embeddings/
    embedded.save_metadata()

With `dask_address`, the shards run on that Dask scheduler's workers (connected for the call); else where a Dask
client is current (`get_client()`, or any `distributed.Client`), on its workers: one task per shard, each taking a
share of a GPU where the workers declare GPU resources. Otherwise they run in this process, one after the other, with
no Prefect server or Dask cluster. Every default and rule is EmbedConfig's, except the fields that shape the cluster
and the task runs the flow starts (FLOW_ONLY), which are refused: the API starts neither.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import signal
import sys
import threading
import time
from typing import Any, Mapping, Optional

from pydantic import TypeAdapter, ValidationError

from wdsembed import caching, faults, fidelity, outputclaim, report, shard
from wdsembed.config import EmbedConfig, EmbedSettings, field_default, speaking_to
from wdsembed.plan import (
    Listed, check_config, plan_run, remove_failed_outputs_made_otherwise, remove_views_without_tables,
)
from wdsembed.shard import ShardPlan, ShardResult, ShardsFailed
from wdsembed.threads import ctrl_c_held

log = logging.getLogger("wdsembed")

# NeMo Curator's names for our fields.
REFERENCE_NAMES = {"image_embedding_column": "embedding_column", "id_col": "id_column"}

# EmbedConfig fields for the Dask cluster and the Prefect task runs that the flow makes, and the API never does:
# refused rather than ignored, saying where each applies.
_CLUSTER = ("the Python API starts no cluster: start one with get_client(n_workers=..., workers_per_gpu=...) and "
            "call the embedder with it current (or pass dask_address), or run the flow (the wdsembed command)")
FLOW_ONLY = {
    "n_workers": "sizes the local Dask cluster that the flow starts; " + _CLUSTER,
    "workers_per_gpu": "sets the worker processes per GPU of the local Dask cluster that the flow starts; " + _CLUSTER,
    "shards_per_task": "groups shards into the flow's Prefect task runs; the Python API runs one Dask task per "
                       "shard: run the flow (the wdsembed command) to group them",
}


class TimmImageEmbedder:
    def __init__(
        self,
        model_name: str = field_default("model_name"),
        pretrained: bool = field_default("pretrained"),
        batch_size: int = field_default("batch_size"),
        num_threads_per_worker: int = field_default("num_threads_per_worker"),
        normalize_embeddings: bool = field_default("normalize_embeddings"),
        autocast: bool = field_default("autocast"),
        use_index_files: bool = field_default("use_index_files"),
        **options: Any,
    ) -> None:
        """`options`: any other EmbedConfig field (checkpoint, embedding, id_column, storage_options...), or
        NeMo Curator's names image_embedding_column and id_col. NeMo Curator's `classifiers` is accepted empty
        only (run classifiers on the saved embeddings)."""
        if options.pop("classifiers", None):
            raise ValueError("classifiers are not supported: embed here, then score the saved embeddings")
        # NeMo Curator's positional order puts image_embedding_column (a name) 5th and classifiers (a list) 7th,
        # where these two flags stand here: pydantic would say only that the flag is no boolean.
        for flag, value, theirs in (("normalize_embeddings", normalize_embeddings, "image_embedding_column"),
                                    ("use_index_files", use_index_files, "classifiers")):
            if isinstance(value, (str, list, tuple)) and not _reads_as_bool(value):
                raise TypeError(f"{flag}={value!r}: after num_threads_per_worker the positional order here is "
                                f"normalize_embeddings, autocast, use_index_files (NeMo Curator's puts {theirs} "
                                "there): pass the arguments after batch_size by keyword")
        for name in ("input", "output"):
            if name in options:
                raise TypeError(f"{name} is given to the call, not the constructor: embedder(input, output)")
        # The names the caller used, for messages (id_col for id_column, say).
        self.given_as = {ours: ours for ours in REFERENCE_NAMES.values() if ours in options}
        for theirs, ours in REFERENCE_NAMES.items():
            if theirs in options:
                if ours in options:
                    raise TypeError(f"give {ours} or {theirs}, not both")
                options[ours] = options.pop(theirs)
                self.given_as[ours] = theirs
        settings = dict(
            model_name=model_name,
            pretrained=pretrained,
            batch_size=batch_size,
            num_threads_per_worker=num_threads_per_worker,
            normalize_embeddings=normalize_embeddings,
            autocast=autocast,
            use_index_files=use_index_files,
            **options,
        )
        # Checked now with EmbedConfig's own rules, so a wrong parameter fails here, not at the first shard.
        with _in_callers_words(self.given_as):
            refuse_flow_only(EmbedSettings.model_validate(settings))
        self.settings = settings

    def config(self, input: str, output: str, *, given_as: Optional[Mapping[str, str]] = None,
               **overrides: Any) -> EmbedConfig:
        with _in_callers_words(self.given_as if given_as is None else given_as):
            return EmbedConfig(**(self.settings | overrides | {"input": input, "output": output}))

    def __call__(self, data, output: Optional[str] = None, *, force: Optional[bool] = None):
        """Embed every shard of `data` into `output`.

        `data` a folder or URL of shards: returns one ShardResult per shard (`output` required).
        `data` an ImageTextPairDataset: returns the dataset with its embeddings (`save_metadata()` writes them
        where you say); `output` defaults to the folder beside the dataset's, `<path>_embeddings`."""
        from wdsembed.nemo import ImageTextPairDataset

        overrides: dict[str, Any] = {} if force is None else {"force": force}
        given_as = self.given_as
        if isinstance(data, ImageTextPairDataset):
            own = self.settings.get("id_column")
            if own is not None and own != data.id_col:  # neither is dropped without a word
                raise ValueError(f"{self.given_as['id_column']}={own!r} and the dataset's id_col {data.id_col!r} "
                                 "differ: give the id column once, ImageTextPairDataset.from_webdataset(path, "
                                 f"id_col={own!r})")
            overrides["id_column"] = data.id_col
            given_as = {**given_as, "id_column": "id_col"}  # the dataset's, which the run takes
            if data.storage_options:
                overrides["storage_options"] = {**self.settings.get("storage_options", {}), **data.storage_options}
            config = self.config(data.path, output or data.default_embeddings_path(), given_as=given_as, **overrides)
        else:
            if output is None:
                raise TypeError("output is required: embedder(input, output)")
            config = self.config(data, output, **overrides)
        results = run_shards(config, given_as=given_as)
        if isinstance(data, ImageTextPairDataset):
            # the folder's shards as the run found them: it may have grown or lost some since the dataset was opened
            return data.with_embeddings(config.output, results, [r.shard for r in results])
        return results


def _reads_as_bool(value: Any) -> bool:
    try:
        TypeAdapter(bool).validate_python(value)  # "true", "0", ... as EmbedConfig takes them
    except ValidationError:
        return False
    return True


@contextlib.contextmanager
def _in_callers_words(given_as: Mapping[str, str]):
    """A refusal raised within names each setting as the caller wrote it: the checks' advice by its keyword (pass
    id_col= ..., not --id-column), pydantic's errors by the name given (id_col, not id_column)."""
    try:
        with speaking_to("api", given_as):
            yield
    except ValidationError as exc:
        if not any(e["loc"] and e["loc"][0] in given_as for e in exc.errors()):
            raise
        errors = [{"type": e["type"], "input": e["input"], "ctx": e.get("ctx", {}),
                   "loc": (given_as.get(e["loc"][0], e["loc"][0]), *e["loc"][1:]) if e["loc"] else ()}
                  for e in exc.errors()]
        raise ValidationError.from_exception_data(exc.title, errors, hide_input=True) from None


def refuse_flow_only(config: EmbedConfig) -> None:
    """ValueError for a FLOW_ONLY field set to other than its default."""
    for name, why in FLOW_ONLY.items():
        if getattr(config, name) != field_default(name):
            raise ValueError(f"{name}={getattr(config, name)!r} {why}")


def run_shards(config: EmbedConfig, *, given_as: Optional[Mapping[str, str]] = None) -> list[ShardResult]:
    """Embed every shard of the config, on the Dask scheduler at config.dask_address, else on the current Dask
    client if any, else here; write the manifest. A run that cannot work is refused first, by the command's own
    checks (plan.check_config: InputError or preflight.PreflightError, ValueErrors that say what to change), before
    the output is claimed or anything in it touched. Raises ShardsFailed (after every other shard is written and the
    manifest too; carrying the manifest, the count of shards and which failures may pass on a retry, as the flow's
    does) when any shard failed, and fidelity.FidelityError (outputs and manifest written) when the run's
    fidelity check is below its threshold. The output is claimed for the run (wdsembed.outputclaim): where another
    run is writing to it, this one fails at once with outputclaim.OutputClaimedError, naming that run. Ctrl-C is
    raised after one line saying what is kept; SIGTERM and SIGHUP end the run as Ctrl-C does, then the process
    (_interruptions_end_the_run). `given_as`: the caller's names of fields (id_col for id_column), which the
    refusals use. The caller's garbage collector is left as it had it (_caller_heap_not_frozen)."""
    with _interruptions_end_the_run(config.output), _caller_heap_not_frozen():
        return _run_shards(config, given_as or {})


@contextlib.contextmanager
def _caller_heap_not_frozen():
    """Shards run in this process (here, or on a threads-only Dask cluster's workers) freeze what is alive in it, as
    a worker process does once its model is built (worker.Worker): the caller's objects too, which, dropped later in
    reference cycles, were then never collected. Unfrozen as the call ends, unless the caller had frozen some
    itself (theirs and ours cannot be told apart)."""
    frozen_before = gc.get_freeze_count()
    try:
        yield
    finally:
        if not frozen_before and gc.get_freeze_count():
            gc.unfreeze()


def _run_shards(config: EmbedConfig, given_as: Mapping[str, str]) -> list[ShardResult]:
    refuse_flow_only(config)
    _import_whole(_CHECKS_IMPORT)
    started = time.perf_counter()
    timeline = {"start": time.time()}  # the run's own steps, in the manifest beside each shard's
    # The command's own checks, before the output is claimed or a scheduler connected to. The shards of a current
    # Dask client run on its workers, whose GPUs this process cannot see.
    from wdsembed.cluster import current_client

    current = current_client()
    if current is not None and current.asynchronous:
        # Its calls answer coroutines on this thread, and this blocking call would stall the loop the client needs.
        raise RuntimeError(
            "the current Dask client is asynchronous (Client(asynchronous=True)) and runs on this thread's event "
            "loop, which this blocking call would stall: call it from a thread, as "
            "`await asyncio.to_thread(embedder, input, output)`")
    with _in_callers_words(given_as):
        check_config(config, on_current_client=current is not None)
    with _dask_client(config) as client:
        # One run writes to an output at a time: refused here, naming the other run, where one is writing to it.
        with outputclaim.held(config) as claim:
            # A .idx only for shards it will compute: a finished shard's tar is never read (as in the flow). The
            # output's other shards are checked for another model's embeddings again now that no other run can add
            # any.
            # The precision check asks the workers the shards run on whether they see a GPU (device auto).
            listed = Listed.after_checks(config)
            plans, finished = plan_run(config, client=client, listed=listed)
            # before the first shard is written: OUTPUT as the planning listed it
            previous = report.retire_manifest(config, plans, finished, listed.output_files())
            timeline["planned"] = time.time()
            # A finished shard is not run again: its result is the one its footer stored, which the planning read.
            todo = [plan for plan in plans if plan.stem not in finished]
            given_up: list = []  # shards Dask gave up on (its scheduler lost): a worker may yet write them whole
            if client is None:
                results, failures, transient = _run_here(config, todo, claim.run)
            else:
                results, failures, transient = _run_on_dask(client, config, todo, claim.run, given_up)
            results += [ShardResult(**finished[plan.stem], cached=True) for plan in plans if plan.stem in finished]
            timeline["collected"] = time.time()
            # As the manifest is written (OUTPUT still claimed), as the flow does.
            late = caching.written_after_all(config, claim.run, given_up, failures, transient)
            results += [ShardResult(**{k: v for k, v in r.items() if k in _RESULT_FIELDS} | {"seconds": 0.0})
                        for r in late]
            remove_failed_outputs_made_otherwise(config, failures)
            remove_views_without_tables(config, claim.run, planned=listed.output_files(), failed=failures)
            results.sort(key=lambda r: r.stem)
            late_dicts = {r["stem"]: r for r in late}  # their time and speed unknown (None), as in the flow
            dicts = [late_dicts.get(r.stem) or r.to_dict() for r in results]
            manifest = report.build_manifest(config, dicts, failures, time.perf_counter() - started, timeline,
                                             previous)
            try:
                manifest["path"] = report.write_manifest(config, manifest, claim.run)
            except report.ManifestNotWritten as exc:
                if not failures:
                    raise
                raise ShardsFailed(report.with_manifest_failure(failures, exc), results, transient,
                                   manifest=exc.manifest, total=len(plans)) from exc
    if failures:
        raise ShardsFailed(failures, results, transient, manifest=manifest, total=len(plans))
    fidelity.check(manifest)  # outputs and manifest are written; the run still fails below the threshold
    return results


@contextlib.contextmanager
def _interruptions_end_the_run(output: str):
    """Ctrl-C (KeyboardInterrupt) is raised to the caller after one line saying what is kept and how to go on.
    SIGTERM (Slurm's scancel, Kubernetes, kill PID) and SIGHUP, where their default is in place and this is the
    main thread, end the run as Ctrl-C does (Terminated: its Dask tasks cancelled, its claim on OUTPUT released),
    then one line says what is kept, and the signal is raised again with its default: the process still ends by it,
    as its sender expects. Their default ended it on the spot, leaving the claim behind (the next run from another
    host was refused for 3 minutes). A repeat of either meanwhile is ignored: the release is not cut short. A
    handler of the caller's own is left as it is."""
    from wdsembed.cli import STOP_SIGNALS, Terminated

    received: list[int] = []

    def terminated(signum, frame):
        for each in ours:
            signal.signal(each, signal.SIG_IGN)
        received.append(signum)
        raise Terminated(signum)

    ours = []
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, terminated)
                ours.append(signum)
    try:
        yield
    except KeyboardInterrupt:
        if not received:  # Ctrl-C, a notebook's Interrupt: raised to the caller, after the line the command says
            log.warning("run interrupted: " + _KEPT, output)
        raise
    finally:
        for signum in ours:
            signal.signal(signum, signal.SIG_DFL)
        if received:
            log.warning("run interrupted by %s: " + _KEPT, signal.Signals(received[0]).name, output)
            signal.raise_signal(received[0])


# What the checks import in this process (the model is built there on the meta device), seconds on a first call.
_CHECKS_IMPORT = ("torch", "timm")


def _import_whole(modules) -> None:
    """Imports `modules` with Ctrl-C held until they are imported. A Ctrl-C (a notebook's Interrupt) in the middle of
    torch's or timm's import left them half-initialized in the caller's process: every later call there, and the
    caller's own `import torch`, failed ("partially initialized module 'torch' has no attribute 'cuda'") until a
    restart. The caller's handler gets the Ctrl-C once they are (a KeyboardInterrupt, by default)."""
    import importlib

    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return
    with ctrl_c_held():
        for name in missing:
            importlib.import_module(name)


_KEPT = ("the shards finished so far are in %s; call again with the same output to finish the rest (finished "
         "shards are not recomputed)")


def embed_here(config: EmbedConfig, plan: ShardPlan, claim_run: Optional[str] = None) -> ShardResult:
    """One shard, in this process (a Dask worker's or the caller's): the one place this module calls the core.
    `claim_run`: the id of the run's claim on OUTPUT, which the shard is written under (shard.process_shard). On a
    Dask worker, the shard stops, unwritten, once its task is cancelled (cluster.task_abandoned)."""
    from wdsembed.cluster import task_abandoned
    from wdsembed.decoderlog import decoder_messages_to_log

    with decoder_messages_to_log():
        return shard.process_shard(config, plan, claim_run=claim_run, abandoned=task_abandoned())


def _run_here(config: EmbedConfig, plans: list, claim_run: str) -> tuple[list, dict, list]:
    """The shards' results, the failed ones' reasons, and which of those may pass on a retry (as _run_on_dask)."""
    results, failures, transient = [], {}, []
    if plans and not gc.get_freeze_count():
        # The Worker an earlier call built freezes nothing now: frozen for this call's shards, as it was for the
        # first one's, so that full collections walk only what they make (run_shards unfreezes as the call ends).
        gc.collect()
        gc.freeze()
    for plan in plans:
        try:
            results.append(embed_here(config, plan, claim_run))
        except Exception as exc:  # noqa: BLE001 - one shard's failure stops no other; all are reported at the end
            _failed(plan.stem, exc, failures, transient)
    return results, failures, transient


def _failed(stem: str, exc: BaseException, failures: dict, transient: list, client=None) -> bool:
    """Records the shard's failure; whether Dask itself lost its task (not the shard's own error)."""
    from wdsembed.cluster import describe_lost_task

    lost = describe_lost_task(exc, client) if client is not None else None  # Dask's own loss, in plain words
    failures[stem] = lost[0] if lost else faults.reason(exc)
    if (lost[1] if lost else faults.is_transient(exc)):
        transient.append(stem)
    return lost is not None


_RESULT_FIELDS = {f.name for f in dataclasses.fields(ShardResult)}


def _run_on_dask(client, config: EmbedConfig, plans: list, claim_run: str,
                 given_up: Optional[list] = None) -> tuple[list, dict, list]:
    """One task per shard on the client's workers; each takes a share of a GPU where the workers declare GPU
    resources, else any free worker thread. `given_up` gets the plans of the failed shards whose task Dask gave up
    on (its workers died, or it was cancelled: its scheduler lost), where a worker may still write them."""
    from distributed import as_completed

    from wdsembed.cluster import (
        GPU_SHARE_PER_SHARD, Ended, StallWatch, check_workers, gpu_slots_declared, rerun_warnings, worker_count,
    )

    # As in the flow: a share of a GPU per shard, so a worker's second thread overlaps one shard's reading and
    # writing with another's time in the pipeline (the worker's lock keeps the pipeline to one shard).
    resources = {"GPU": GPU_SHARE_PER_SHARD} if gpu_slots_declared(client) else None
    if plans:  # what the workers lack is said once, before any shard goes to them
        check_workers(client, config, plans[0].shard, modules=("wdsembed.api",))
    futures = {}  # every shard's future, as it is submitted -> its plan
    uncollected = {}  # those whose end is not yet taken
    results, failures, transient = [], {}, []

    def collect(future) -> None:
        plan = uncollected.pop(future)
        try:
            results.append(future.result())
        except Exception as exc:  # noqa: BLE001 - a shard's error, or its worker lost (KilledWorker)
            if _failed(plan.stem, exc, failures, transient, client) and given_up is not None:
                given_up.append(plan)
        finally:
            future.release()  # Dask need keep its result no longer

    ended = Ended()  # the shards that end while the others are still being submitted
    try:
        for plan in plans:
            # Ctrl-C held over each submit: one that came in its middle left a task submitted but not yet among
            # `futures`, which the interruption below cancels.
            with ctrl_c_held():
                # Keyed by this run (its claim's id): Dask never takes another run's task for one of these.
                future = client.submit(embed_here, config, plan, claim_run, key=f"wdsembed-{plan.stem}-{claim_run}",
                                       resources=resources, pure=False)
                futures[future] = uncollected[future] = plan
                ended.add(future)
            # Taken as they end, not once all are submitted (a submit takes about 0.5 ms on a loaded machine: 2 s
            # for 4,000 shards), as in the flow.
            for each in ended.take():
                collect(each)
        log.info("%d shard(s) submitted to the Dask scheduler at %s (%s), %d worker(s)%s", len(plans),
                 client.scheduler.address, "dask_address" if config.dask_address else "the current Dask client's",
                 worker_count(client), ", one GPU each" if resources else "")
        # On this client's loop: as_completed() without one asks for the current client, and the call's own client
        # (dask_address) is never made current, nor is there any in a plain script.
        with StallWatch(client, futures, log.warning):  # workers all paused for their memory: said, then ended
            for future in as_completed(list(uncollected), loop=client.loop):
                collect(future)
    except BaseException:
        # Interrupted (Ctrl-C in a notebook), also while submitting: the shards not yet collected would run on, kept
        # alive by the traceback that the REPL keeps, each embedded only to be refused at its write (the claim goes
        # as this call ends), with the next call's shards queued behind them.
        client.cancel(list(futures))
        raise
    # Not where the client lost its scheduler: it would wait for it up to Dask's connect timeout (30 s) for an event
    # log it cannot read, holding OUTPUT's claim.
    reruns = rerun_warnings(client, {future.key: [plan.stem] for future, plan in futures.items()}) \
        if client.status == "running" else {}
    for result in results:  # a shard whose worker died under it, run again whole, says so, as in the flow
        if result.stem in reruns:
            result.warnings = list(result.warnings) + [reruns[result.stem]]
    return results, failures, transient


@contextlib.contextmanager
def _dask_client(config: EmbedConfig):
    """The Dask client the shards run on: with config.dask_address, one connected to that scheduler for this call
    and closed after (the current client, where it is that scheduler's); else the current client; else None."""
    from wdsembed.cluster import current_client, same_scheduler

    current = current_client()
    address = config.dask_address
    if not address or (current is not None and same_scheduler(current.scheduler.address, address)):
        yield current
        return
    from distributed import Client

    try:
        # Not made current: the caller's own client, if any, stays the default after the call.
        client = Client(address, set_as_default=False)
    except OSError as exc:
        raise OSError(f"dask_address {address}: cannot connect to the Dask scheduler there ({exc})") from None
    with client:
        yield client
