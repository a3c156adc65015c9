"""Resume and caching across runs: where Prefect keeps the embedding tasks' results, and which shards are done.

Two layers agree on one cache key (shard.cache_key: the shard's fingerprint, the model and weights, the
preprocessing and embedding options, the declared recipe and output-format versions, the library versions):

* Prefect's task cache: the embedding task's result (a small JSON dict) is persisted under that key in
  `result_storage`, so a finished shard's task run ends "Cached" without running on a worker.
* The output's parquet footer holds the same key, and the parts it hashes in readable form. The flow reads every
  planned output's footer before submitting and sends the shards whose output is missing, cut short, unreadable at
  its footer (or below it, where its kNN view must be rebuilt from it: shard.finished_output) or made from other
  inputs with `refresh_cache=True`: a deleted output is recomputed, never reported as cached from a stale task
  result; with verify_outputs, so is one damaged below its footer (each output is then read whole). For those
  made from other inputs, the parts their footers recorded say what changed (shard.why_recomputed), before any
  work: an upgrade or a touched tar is told from an intended change. An output made under the key of the model's
  other spelling (`resnet18` for `resnet18.a1_in1k`: shard.made_as_spelled_otherwise) is finished too: the footer
  check finds it, though Prefect's cache, keyed by the name as typed, does not.

Nothing here imports Prefect or CUDA libraries (tasks.embed.result_storage_for makes the Prefect storage).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

from wdsembed import output, outputclaim, shard, storage
from wdsembed.config import EmbedConfig
from wdsembed.threads import ContextThreadPool

log = logging.getLogger("wdsembed")

RESULTS_FOLDER = "_prefect_results"  # under OUTPUT; a leading "_" keeps dataset readers (pyarrow, Spark) out


def result_storage_url(config: EmbedConfig) -> str:
    return config.result_storage or storage.join(config.output, RESULTS_FOLDER)


def planned_outputs(config: EmbedConfig, plans: Iterable[shard.ShardPlan], *, max_workers: int = 16,
                    verified: Optional[dict] = None,
                    checked: Optional[dict] = None) -> tuple[dict[str, dict], dict[str, str]]:
    """The outputs that exist, are readable and carry this run's cache key (reads only footers), as stem -> the
    shard's result stored in its footer (ShardResult's fields, but `cached` and `seconds`), and, for each output of
    ours made under another key, why it is recomputed (shard.why_recomputed, from the same footer). Raises
    output.ForeignOutputError naming every planned output path that holds a parquet wdsembed did not write: the
    footers read here are what tells them apart, so the run is refused before any shard overwrites one. `verified`
    gets stem -> (fingerprint token, sound) of each output read whole (verify_outputs, or a kNN view rebuilt from a
    damaged table) (ShardPlan.output_verified). `checked`: output path (of OUTPUT's filesystem) -> the footer
    metadata the run's checks read of that very file (plan.Listed.checked_footers), taken instead of reading it."""
    plans = list(plans)
    checked = checked or {}
    _, out_root = storage.filesystem(config.output, config.storage_options)
    recompute: dict[str, str] = {}

    def made_otherwise(plan: shard.ShardPlan, meta: dict) -> None:
        recompute[plan.stem] = shard.why_recomputed(meta, shard.cache_key_parts(config, plan))

    def done(plan: shard.ShardPlan) -> Optional[dict]:  # its footer metadata where finished, None: a file not ours
        try:
            meta = shard.finished_output(
                config, plan, shard.cache_key(config, plan), made_otherwise=lambda meta: made_otherwise(plan, meta),
                checked_meta=checked.get(storage.join(out_root, plan.stem + ".parquet")),
                verified=lambda token, sound: verified.__setitem__(plan.stem, (token, sound))
                if verified is not None else None)
        except output.ForeignOutputError:
            return None
        except Exception as exc:  # noqa: BLE001 - unknown means "recompute", never "cached"
            log.warning("shard %s: cannot read its output's footer (%s); recomputing it", plan.stem, exc)
            return {}
        return meta or {}

    with ContextThreadPool(max(1, min(max_workers, len(plans)))) as pool:
        states = list(pool.map(done, plans))
    foreign = [f"{plan.stem}.parquet" for plan, meta in zip(plans, states) if meta is None]
    if foreign:
        raise output.ForeignOutputError(foreign, config.output)
    return {plan.stem: shard.stored_result(meta, plan) for plan, meta in zip(plans, states) if meta}, recompute


def written_results(config: EmbedConfig, plans: Iterable[shard.ShardPlan]) -> list[dict]:
    """The results stored with the plans' outputs that exist whole with this run's cache key (reads only footers):
    what a task whose worker was lost for good had written before it died."""
    results = []
    for plan in plans:
        try:
            meta = shard.finished_output(config, plan, shard.cache_key(config, plan), repair_view=False)
        except Exception as exc:  # noqa: BLE001 - unknown counts as not written: the shard is reported failed
            log.warning("shard %s: cannot read its output's footer (%s)", plan.stem, exc)
            continue
        if meta is not None:
            results.append(shard.ShardResult(**shard.stored_result(meta, plan)).to_dict())
    return results


def made_by_an_unseen_attempt(result: dict) -> dict:
    """A shard this run computed in an attempt whose result it never had (a retried group's, one lost with its
    worker or its scheduler), found done after: computed, its time and speed unknown (None), not those of finding it
    done (0.0)."""
    return {**result, "cached": False, "seconds": None, "images_per_second": None, "timeline": {}}


def written_after_all(config: EmbedConfig, claim_run: str, plans: Iterable[shard.ShardPlan], failures: dict,
                      transient) -> list[dict]:
    """Of the failed shards among `plans` that the run gave up on while a worker may still have been running them
    (its Dask scheduler lost: the worker, closing, ends the shard it runs and writes it under the run's claim), those
    whose output is whole now, as the manifest is about to be written: taken out of `failures` and `transient` (a
    dict and a set or list of stems) and returned as results (made_by_an_unseen_attempt). Counted by their outputs,
    so that the manifest never lists a shard as failed beside its whole output; closed first in the run's claim
    `claim_run` (outputclaim.close_shards), so that no worker puts one in place after the count: the count is final.
    The flow and the API call it alike."""
    given_up = [p for p in plans if p.stem in failures]
    if not given_up:
        return []
    outputclaim.close_shards(config, claim_run, [p.stem for p in given_up])
    written = written_results(config, given_up)
    for result in written:
        failures.pop(result["stem"])
        log.warning("shard %s: its output was written whole after all, by its worker after the run had given up on "
                    "its task; counted finished", result["stem"])
        if result["stem"] in transient:
            transient.remove(result["stem"])
    return [made_by_an_unseen_attempt(r) for r in written]
