"""What a run tells its user: the manifest, the per-shard table and the one-screen summary."""
from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Optional

from wdsembed import fidelity, output, outputclaim, storage
from wdsembed.config import EmbedConfig
from wdsembed.tarstream import tar_quote
from wdsembed.threads import ContextThreadPool
from wdsembed.versions import code_version, package_versions

TABLE_COLUMNS = ("shard", "rows", "embedded", "failed", "status", "seconds", "images_per_second")
# A manifest's shard entry: what its output's footer records of it (its result), and the figures of its run.
ENTRY_FIELDS = ("output", "rows", "samples", "embedded", "failed", "cache_key", "batch_size")
FIGURES = ("seconds", "embed_seconds", "images_per_second", "timeline")

# The most the summaries (the terminal's, the markdown artifact, a failed run's message) list, so that a run of
# 10,000 shards still ends in one screen: shards in the table, causes of failures or warnings, shards named for each.
# Every shard is in OUTPUT/_manifest.json and in the flow run's `shards` table artifact.
SUMMARY_ROWS = 20
SUMMARY_CAUSES = 5
SHARDS_NAMED = 5


def embedded_rows(result: dict) -> int:
    """A shard's rows with an embedding. Not its `embedded`, the images embedded: a key the parquet repeats has
    its one image's embedding on each of its rows (`failed` counts the rows without one)."""
    return result["rows"] - result["failed"]


def entry_fields(result: dict) -> dict:
    """A shard's counts and settings in the manifest (ENTRY_FIELDS), with its `embedded_rows`: a script summing
    `embedded` counts images, not the rows with an embedding (see embedded_rows)."""
    # `tar`: the shard read, so that a row's key leads back to its image (the result calls it `shard`)
    return _with_embedded_rows({k: result.get(k) for k in ENTRY_FIELDS} | {"tar": result.get("shard")})


def _with_embedded_rows(entry: dict) -> dict:
    """`entry` with its `embedded_rows`, where its rows and failed give them (an entry that a version before them
    wrote, kept from manifest to manifest, has none of its own)."""
    if isinstance(entry.get("rows"), int) and isinstance(entry.get("failed"), int):
        return entry | {"embedded_rows": embedded_rows(entry)}
    return entry


def made_as(entry: dict, name, config: EmbedConfig) -> dict:
    """A shard's manifest entry saying, as `model_name`, the name its output was made under (`name`, as its footer
    records it) where that is not this run's: another spelling of the run's model, whose output is finished for it
    too (shard.made_as_spelled_otherwise: `resnet18` for `resnet18.a1_in1k`), and whose cache key is that
    spelling's. The manifest's model is named as this run was given it (this_runs_model)."""
    entry = {k: v for k, v in entry.items() if k != "model_name"}
    return entry | {"model_name": name} if name and name != config.model_name else entry


def this_runs_model(config: EmbedConfig, results: list[dict]) -> Optional[dict]:
    """The model as the finished shards recorded it (the first one's record made under this run's name, else the
    first one's), named as this run was given it: a run of `resnet18.a1_in1k` whose outputs were all made under
    `resnet18` (made_as) named the model `resnet18`, its first footer's name. Its `spellings` start with this run's,
    as those of a record made under it do."""
    recorded = [r["model"] for r in results if r.get("model")]
    if not recorded:
        return None
    model = next((m for m in recorded if m.get("name") == config.model_name), recorded[0])
    if model.get("name") == config.model_name:
        return model
    spellings = model.get("spellings")
    if isinstance(spellings, list):
        spellings = {"spellings": [config.model_name, *(n for n in spellings if n != config.model_name)]}
    return model | {"name": config.model_name} | (spellings or {})


def shard_rows(results: Iterable[dict], failures: dict[str, str], manifest: Optional[dict] = None) -> list[dict]:
    """One row per shard, finished or failed, for the table artifact: its rows, those with an embedding and those
    without. With the run's `manifest`, a finished shard's seconds and images/s are the manifest's (embedding-only
    rate; a cached shard keeps those of the run that computed it)."""
    figures = (manifest or {}).get("shards") or {}
    rows = []
    for r in results:
        shard = figures.get(r["stem"]) or {}
        seconds = shard.get("seconds", r.get("seconds", 0.0))
        rows.append({
            "shard": r["stem"], "rows": r["rows"], "embedded": embedded_rows(r), "failed": r["failed"],
            "status": "cached" if r.get("cached") else "computed",
            "seconds": None if seconds is None else round(seconds, 2),
            "images_per_second": shard.get("images_per_second", r.get("images_per_second", 0.0)),
        })
    for stem, reason in sorted(failures.items()):
        rows.append({"shard": stem, "rows": 0, "embedded": 0, "failed": 0, "status": f"FAILED: {reason}",
                     "seconds": 0.0, "images_per_second": 0.0})
    return sorted(rows, key=lambda row: row["shard"])


def embedding_seconds(result: dict) -> Optional[float]:
    """Seconds the shard spent embedding (DALI and the model), without the worker's model load before it or the
    write after it; None where its timeline does not say."""
    timeline = result.get("timeline") or {}
    start, end = timeline.get("embed_start"), timeline.get("embed_end")
    if start is None or end is None or end < start:
        return None
    return end - start


def shard_figures(results: list[dict], previous: dict) -> dict[str, dict]:
    """Per shard: seconds (the whole task, the first shard of a worker including its model load), embed_seconds
    and images_per_second (embedded images over embed_seconds), timeline. A cached shard did no work in this run:
    it keeps the figures of the run that computed it, from the previous manifest's shards (`previous`, as
    earlier_shards gave them) when its cache key matches there, else null (unknown), never 0."""
    figures = {}
    for r in results:
        before = previous.get(r["stem"]) or {}
        if r.get("cached"):
            if before.get("cache_key") and before.get("cache_key") == r.get("cache_key"):
                figures[r["stem"]] = {k: before.get(k) for k in FIGURES}
            else:
                figures[r["stem"]] = {"seconds": None, "embed_seconds": None, "images_per_second": None,
                                      "timeline": r.get("timeline")}
            continue
        embed = embedding_seconds(r)
        rate = (round(r["embedded"] / embed, 1) if embed else 0.0) if embed is not None \
            else r.get("images_per_second", 0.0)
        figures[r["stem"]] = {"seconds": r.get("seconds"), "embed_seconds": None if embed is None else round(embed, 3),
                              "images_per_second": rate, "timeline": r.get("timeline")}
    return figures


# A manifest's status for a shard this run did not name, whose output an earlier run wrote and OUTPUT still holds.
EARLIER_RUN = "earlier_run"


def retire_manifest(config: EmbedConfig, plans: Iterable, finished: Collection[str],
                    files: Optional[Collection[str]] = None) -> dict:
    """The shards of the manifest OUTPUT holds from an earlier run, as earlier_shards gives them, for
    build_manifest. A run that will write any shard (a plan whose stem is not `finished`, or any with force)
    removes that manifest here, holding OUTPUT's claim and before its first write, and writes its own at its end: a
    run that dies between leaves no manifest, as a first run killed does, never one that describes outputs it has
    since replaced. A run that writes no shard keeps it until its own replaces it. `files`: every file under OUTPUT,
    as the planning listed them holding the claim (plan.output_files), which earlier_shards takes for its listing."""
    previous = earlier_shards(config, {plan.stem for plan in plans}, files)
    if config.force or any(plan.stem not in finished for plan in plans):
        fs, root = storage.filesystem(config.output, config.storage_options)
        output.remove_manifest(root, fs)
    return previous


def earlier_shards(config: EmbedConfig, named: Collection[str], files: Optional[Collection[str]] = None) -> dict:
    """The shards of the manifest OUTPUT holds from an earlier run: those this run names as that manifest has them
    (the figures of those cached now: shard_figures), and of the others those whose output OUTPUT still holds,
    marked EARLIER_RUN with the run that described them (`from_run`: its manifest's creation and input; the first
    such run's, for an entry carried on from manifest to manifest), which the new manifest keeps, naming their
    outputs where they are now and, where they were made under another spelling of the model, that (made_as). An
    output of a shard this run does not name that no manifest describes (a run that wrote it was killed before its
    manifest, or it failed in that run and kept its earlier output) gets its entry from its own footer, `from_run`
    null. Those outputs are finished and of this run's settings: the planning refused a run beside outputs of shards
    it does not name made otherwise (plan.check_outputs_beside), and a run that writes any shard removes the manifest
    before its first write (retire_manifest), so a manifest there still describes them. One listing of OUTPUT, only
    where there is no manifest or it names shards this run does not (`files`, where the caller listed OUTPUT since
    its last write)."""
    try:
        fs, root = storage.filesystem(config.output, config.storage_options)
        before = output.read_manifest(root, fs)
        shards = (before or {}).get("shards") or {}
        others = [stem for stem in shards if stem not in named]
        unnamed = others or any(stem not in named for stem in (before or {}).get("failed_shards") or {})
        held = _outputs_held(fs, root, files) if before is None or unnamed else set()
        undescribed = _entries_from_footers(config, fs, root, held, set(named) | set(shards))
    except Exception:  # noqa: BLE001 - a missing or damaged old manifest only means no figures or entries to keep
        return {}
    run = {"created": (before or {}).get("created"), "input": (before or {}).get("input")}
    spelled = ((before or {}).get("config") or {}).get("model_name")  # the model's name in the run it describes
    # an entry carried on keeps its from_run, null for one that a footer gave
    kept = {stem: made_as(_with_embedded_rows(shards[stem])
                          | {"output": storage.to_url(fs, storage.join(root, f"{stem}.parquet")),  # where it is now
                             "status": EARLIER_RUN, "from_run": shards[stem].get("from_run", run)},
                          shards[stem].get("model_name") or spelled, config)
            for stem in others if f"{stem}.parquet" in held}
    return {stem: entry for stem, entry in shards.items() if stem in named} | kept | undescribed


def _entries_from_footers(config: EmbedConfig, fs, root: str, held: set[str], described: set[str]) -> dict:
    """EARLIER_RUN entries, from their footers, of the shards' outputs among `held` (paths relative to OUTPUT) whose
    stems are not `described`, each named where it is now; a file without our footer is no output of a shard, and
    gets none."""
    stems = [rel[:-len(".parquet")] for rel in sorted(held)
             if rel != output.MANIFEST_NAME and not rel.startswith(output.EMBEDDINGS_FOLDER + "/")
             and output.is_output_name(rel) and rel[:-len(".parquet")] not in described]
    if not stems:
        return {}
    with ContextThreadPool(max(1, min(16, len(stems)))) as pool:
        footers = pool.map(lambda stem: output.read_output_metadata(storage.join(root, f"{stem}.parquet"), fs),
                           stems)
        results = {stem: (meta or {}).get("result") for stem, meta in zip(stems, footers)}
    return {stem: made_as(entry_fields(result) | dict.fromkeys(FIGURES)
                          | {"output": storage.to_url(fs, storage.join(root, f"{stem}.parquet")),
                             "warnings": result.get("warnings") or [], "status": EARLIER_RUN, "from_run": None},
                          (result.get("model") or {}).get("name"), config)
            for stem, result in results.items() if isinstance(result, dict)}


def _outputs_held(fs, root: str, files: Optional[Collection[str]] = None) -> set[str]:
    """The shards' output tables under OUTPUT, as paths relative to it (00000.parquet, train/00001.parquet), from
    `files` where the caller listed OUTPUT."""
    prefix = root.rstrip("/") + "/"
    try:
        listed = fs.find(root, withdirs=False) if files is None else files
        return {path[len(prefix):] for path in listed if path.startswith(prefix)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


# The embedding span, per worker, below which the summaries leave the GPU use unsaid: on a shorter one, a worker's
# first batches (its pipeline filling) and its last shard's tail weigh too much for the rate to say anything of the
# host.
GPU_USE_MIN_SECONDS = 5.0
# The share of the model's own rate below which the report says that the input path held the GPU back. On one H200
# with a slow host, the shards fed ViT-L/14 at 0.957 of the worker's own timing, ViT-B/16 at 0.905 and ResNet-50 at
# 0.68-0.75, where two workers then ran ResNet-50 1.04x as fast (docs/benchmarks.md, forty-sixth session; 1.39x on
# another such host, forty-fifth). On a fast host, ResNet-50's shards ran at 0.92 of the bench's timing of the model
# (round S, docs/benchmarks/h200.json).
GPU_HELD_BACK_BELOW = 0.85


def merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end] intervals, as sorted disjoint intervals (spans that overlap count once)."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def embedding_by_worker(shards: Iterable[dict]) -> dict[str, tuple[int, float]]:
    """Per worker process: the images its shards embedded, and the seconds their embedding spans cover together (a
    worker's stream takes its shards one behind the other, the next one's span starting while the previous one's
    last batches finish: the spans are merged, not summed). Shards whose timeline has no span are left out."""
    found: dict[str, list] = {}  # worker -> [images, its shards' embedding spans]
    for s in shards:
        t = s.get("timeline") or {}
        if {"worker", "embed_start", "embed_end"} <= t.keys():
            acc = found.setdefault(t["worker"], [0, []])
            acc[0] += s.get("embedded", 0)
            acc[1].append((t["embed_start"], t["embed_end"]))
    return {w: (n, sum(b - a for a, b in merged(spans))) for w, (n, spans) in found.items()}


def gpu_use(results: list[dict]) -> Optional[dict]:
    """How fast this run's shards fed the model on its GPUs (each worker's images over its embedding time, summed
    over the workers), against the model's own rate there (timed by each worker as it started: wdsembed.worker).
    The model's own rate, and the ratio, only where each GPU ran one worker: workers that share a GPU timed the model
    beside each other, so its own rate there is not known. None where no computed shard has the figures (the CPU, a
    model not run as a CUDA graph)."""
    timed = [r for r in results if not r.get("cached")
             and {"gpu", "model_alone_images_per_second"} <= (r.get("timeline") or {}).keys()]
    by_worker = embedding_by_worker(timed)
    if not by_worker:
        return None
    figures = {r["timeline"]["worker"]: (r["timeline"]["gpu"], r["timeline"]["model_alone_images_per_second"])
               for r in timed}  # worker -> (its GPU, its timing of the model)
    fed = sum(n / seconds for n, seconds in by_worker.values() if seconds > 0)
    gpus = len({figures[w][0] for w in by_worker})
    alone = sum(figures[w][1] for w in by_worker) if gpus == len(by_worker) else None
    return {"gpus": gpus, "workers": len(by_worker),
            "model_alone_images_per_second": None if alone is None else round(alone, 1),
            "fed_images_per_second": round(fed, 1), "ratio": round(fed / alone, 3) if alone else None,
            "embedding_seconds": round(min(seconds for _, seconds in by_worker.values()), 2)}


def describe_gpu_use(manifest: dict) -> Optional[str]:
    """One line on how fully the run used its GPUs' model, with advice where the input held it back; None where
    there is nothing sure to say (no figures, or too short a run)."""
    use = manifest.get("gpu_use")
    if not use or use["embedding_seconds"] < GPU_USE_MIN_SECONDS:
        return None
    on = f"{use['gpus']} GPUs" if use["gpus"] > 1 else "its GPU"
    fed = f"GPU use: the shards fed the model {use['fed_images_per_second']:,.0f} images/s"
    if use.get("ratio") is None:  # workers shared a GPU: the rate they fed it, to set beside a one-worker run's
        workers = (f"from {use['workers']} workers" if use["gpus"] == 1
                   else f"{use['workers'] / use['gpus']:g} workers on each")
        return f"{fed} on {on}, {workers} (the model's own rate is not timed where workers share a GPU)"
    line = f"{fed}, {use['ratio']:.2f} of the {use['model_alone_images_per_second']:,.0f} it runs alone on {on}"
    if use["ratio"] >= GPU_HELD_BACK_BELOW:
        return line
    line += (": the input path (reading the tars and feeding DALI, one Python thread per worker, or decoding) held "
             "the model back")
    config = manifest.get("config") or {}
    if (config.get("workers_per_gpu") or 1) > 1:
        return line
    if config.get("dask_address"):  # workers_per_gpu shapes only the cluster a run starts itself
        return line + ("; with a model this fast on this host, two worker processes per GPU may run faster (on a "
                       "cluster of your own: `dask cuda worker` started twice on each node)")
    return line + ("; with a model this fast on this host, two workers per GPU may run faster (workers_per_gpu=2, "
                   "--workers-per-gpu 2)")


def totals(results: list[dict], wall_seconds: float, kept: Optional[dict] = None) -> dict:
    """This run's shards: those it computed or found finished (`shards`, `computed`, `cached`), their rows and
    images, and what it embedded; `in_output`: what OUTPUT holds after it, those shards and the ones `kept` from
    earlier runs (EARLIER_RUN)."""
    computed = [r for r in results if not r.get("cached")]
    embedded_now = sum(r["embedded"] for r in computed)
    return {
        "shards": len(results),
        "computed": len(computed),
        "cached": len(results) - len(computed),
        **counts(results),
        "shards_with_warnings": sum(1 for r in results if r.get("warnings")),
        "embedded_this_run": embedded_now,
        "wall_seconds": round(wall_seconds, 2),
        "images_per_second": round(embedded_now / wall_seconds, 1) if wall_seconds > 0 else 0.0,
        "in_output": {"shards": len(results) + len(kept or {}), EARLIER_RUN: len(kept or {}),
                      **counts([*results, *(kept or {}).values()])},
    }


def counts(shards: list[dict]) -> dict:
    """The rows of finished shards (results or manifest entries), and their images embedded."""
    return {
        "rows": sum(r["rows"] for r in shards),
        "embedded": sum(r["embedded"] for r in shards),  # images; a key the parquet repeats is one image, not two
        "embedded_rows": sum(embedded_rows(r) for r in shards),  # rows = embedded_rows + failed_rows
        "failed_rows": sum(r["failed"] for r in shards),
    }


class Manifest(dict):
    """A run's manifest: a plain dict in every use (indexing, json.dumps, ==, pickling), as written to
    OUTPUT/_manifest.json, whose repr is one short line. A notebook cell ending in `flows.embed.run(...)` printed
    every shard's entry: tens of thousands of lines at scale. The counts are those of its `totals` (this run's
    shards), `failed_shards` counted; `earlier_run` only where OUTPUT holds shards of earlier runs."""

    def __repr__(self) -> str:
        totals = self.get("totals") or {}
        said = {name: totals.get(name, "?") for name in ("shards", "computed", "cached")}
        said["failed_shards"] = len(self.get("failed_shards") or {})
        earlier = (totals.get("in_output") or {}).get(EARLIER_RUN)
        if earlier:
            said[EARLIER_RUN] = earlier
        said |= {name: totals.get(name, "?") for name in ("rows", "embedded_rows", "failed_rows", "wall_seconds")}
        listed = ", ".join(f"{name}={value}" for name, value in said.items())
        written = f", path={self['path']!r}" if self.get("path") else ""  # not written: no path
        return f"Manifest(output={self.get('output')!r}, {listed}{written})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))  # IPython's dict printer would list every entry


def build_manifest(config: EmbedConfig, results: list[dict], failures: dict[str, str], wall_seconds: float,
                   timeline: Optional[dict] = None, previous: Optional[dict] = None) -> Manifest:
    """The run's manifest. `timeline`: the run's own steps as epoch seconds (start, planned, first_started: the
    first task let to start alone, submitted, collected: the last shard's result back), to which the report's start
    is added; with each shard's own timeline, it shows where a run spends the time outside its shards. `previous`:
    the earlier manifest's shards, as retire_manifest gave them (None: read from OUTPUT now): the figures of the
    shards cached now (shard_figures), and the entries of the shards this run does not name whose outputs OUTPUT
    still holds, kept as they were, marked EARLIER_RUN: the manifest describes every output in OUTPUT. Its size stays
    that of one entry per shard: a kept entry is the earlier one, never a history of them."""
    named = {r["stem"] for r in results} | set(failures)
    if previous is None:
        previous = earlier_shards(config, named)
    kept = {stem: entry for stem, entry in previous.items()
            if stem not in named and entry.get("status") == EARLIER_RUN}
    figures = shard_figures(results, previous)
    shards = {
        r["stem"]: made_as(entry_fields(r)
                           | figures[r["stem"]]
                           | {"warnings": r.get("warnings") or []}
                           | {"status": "cached" if r.get("cached") else "computed"},
                           (r.get("model") or {}).get("name"), config)
        for r in results
    }
    return Manifest({
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": config.input,
        "output": config.output,
        # Storage options stay out: they may hold credentials.
        "config": config.model_dump(exclude={"storage_options"}),
        "model": this_runs_model(config, results),
        "versions": package_versions() | {"wdsembed-code": code_version()},
        "totals": totals(results, wall_seconds, kept),
        "shards": shards | kept,
        "failed_shards": failures,
        "rows_without_embedding": rows_without_embedding(results),
        # Cached shards count with the cosines stored in their outputs, against this run's threshold.
        "fidelity": fidelity.summarize(config, results),
        "gpu_use": gpu_use(results),
        "timeline": {**(timeline or {}), "report": time.time()},
    })


def this_run_shards(manifest: dict) -> dict[str, dict]:
    """The manifest's shards that its run named and finished (computed or cached), without those kept from
    earlier runs (EARLIER_RUN): what its summaries list."""
    return {stem: s for stem, s in (manifest.get("shards") or {}).items() if s.get("status") != EARLIER_RUN}


class ManifestNotWritten(OSError):
    """OUTPUT/_manifest.json could not be written (a full disk, a store refusing it): the shards' outputs stand, the
    run's record of them does not. The OSError's errno and words as they were (faults.is_disk_full reads the one;
    the other names the file and the cause); `manifest`: the one not written, which the run still reports."""

    manifest: Optional[dict] = None


def write_manifest(config: EmbedConfig, manifest: dict, claim_run: Optional[str] = None) -> str:
    """Write the run's manifest; its path. Raises ManifestNotWritten where it cannot be written: a run's expected
    end, said in one line after the shards' own failures (with_manifest_failure), never a traceback. `claim_run`:
    the run's claim on OUTPUT (outputclaim.Claim.run), which must still be its own: a run whose claim was taken
    over (its heartbeats stopped for minutes) leaves the manifest to the run that took it."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    try:
        outputclaim.check_still_held(config, claim_run, "this run's manifest",
                                     "The shards it wrote stay, without its record of them")
    except outputclaim.OutputClaimLostError as exc:
        error = ManifestNotWritten(str(exc))
        error.manifest = manifest
        raise error from exc
    try:
        return storage.to_url(fs, output.write_manifest(root, fs, manifest))
    except OSError as exc:
        said = str(exc)  # its words, with the file names it has
        error = (ManifestNotWritten(exc.errno, said.removeprefix(f"[Errno {exc.errno}] ")) if exc.errno
                 else ManifestNotWritten(said))
        error.manifest = manifest
        raise error from exc


def with_manifest_failure(failures: dict[str, str], error: ManifestNotWritten) -> dict[str, str]:
    """The failed shards' reasons, then the manifest's (under its file name): the shards' own are the news, often of
    the same cause (a full disk), so they come first."""
    return failures | {output.MANIFEST_NAME: str(error)}


def describe_earlier_runs(manifest: dict) -> Optional[str]:
    """One line on the finished outputs OUTPUT holds beyond this run's shards, those of earlier runs that this one
    did not name (the manifest keeps their entries); None where there are none."""
    held = (manifest.get("totals") or {}).get("in_output") or {}
    if not held.get(EARLIER_RUN):
        return None
    return (f"output holds {held['shards']:,} finished shard(s), {held['embedded_rows']:,} of {held['rows']:,} rows "
            f"embedded: {held[EARLIER_RUN]:,} of them from earlier runs, which this run did not name (in the manifest "
            f"as {EARLIER_RUN})")


def one_line(text) -> str:
    """`text` (a name) as it is, or, where it holds a control character (a line break would end a table row or a
    list item, an escape sequence would colour the terminal), as `tar tf` lists such a name (tar_quote: `\\n`,
    `\\033`, its backslashes doubled)."""
    text = str(text)
    return text if text.isprintable() else tar_quote(text)


# What Markdown may read as markup inside a line: code (`), emphasis (* _), links ([ ]), raw HTML and autolinks
# (< >), entities (&), GFM's strikethrough (~) and table cells (|), and the backslash that escapes them all.
_MARKUP = re.compile(r"([\\`*_\[\]<>&~|])")


def md_text(text) -> str:
    """`text` (a name, a reason) as Markdown that renders as it is, in a line of text or a table cell: each
    character that Markdown may read as markup backslash-escaped (CommonMark reads any ASCII punctuation so)."""
    return _MARKUP.sub(r"\\\1", one_line(text))


def md_cell(text) -> str:
    """md_text for a cell of a table, where GFM trims the spaces at its ends: those as character references."""
    said = md_text(text)
    inner = said.strip(" ")
    if not inner:
        return "&#32;" * len(said)
    lead, trail = len(said) - len(said.lstrip(" ")), len(said) - len(said.rstrip(" "))
    return "&#32;" * lead + inner + "&#32;" * trail


def md_code(text) -> str:
    """`text` as a Markdown code span that renders as it is, outside a table (GFM ends a cell at `|` even in code):
    fenced by one backquote more than its longest run of them, with a space inside each fence where it starts or ends
    with a backquote or with spaces at both ends (CommonMark takes one space off each end), on one line."""
    said = one_line(text)
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", said)), default=0))
    pad = " " if "`" in (said[:1], said[-1:]) or (said[:1] == said[-1:] == " " and said.strip(" ")) else ""
    return f"{fence}{pad}{said}{pad}{fence}"


@dataclass(frozen=True)
class Style:
    """How the summaries write what a run was given or found: `name` (a shard, a key, a model, a path) and `text` (a
    reason, a line of words holding names). PLAIN for messages and logs, as they are; TERMINAL for the CLI's summary,
    each on one line (a name holding a line break split the table's row, an escape sequence coloured the terminal);
    MARKDOWN for the summary artifact, where a `|`, `*` or backquote in a shard's name would be read as markup."""

    name: Callable[[str], str] = str
    text: Callable[[str], str] = str


PLAIN = Style()
TERMINAL = Style(one_line, one_line)
MARKDOWN = Style(md_code, md_text)


def describe_model(manifest: dict, style: Style = PLAIN) -> str:
    """The model as the finished shards recorded it; where none finished, the name the run was given and that no
    shard says more (rather than a line of Nones), written in `style`."""
    model = manifest.get("model")
    if not model:
        name = (manifest.get("config") or {}).get("model_name", "?")
        return f"{style.name(name)} (no shard finished: weights, embedding and dimensions unknown)"
    return (f"{style.name(model.get('name', '?'))} ({style.text(model.get('weights', '?'))}), "
            f"{model.get('embedding', '?')} embedding, {model.get('dim', '?')} dimensions")


def this_run_in_words(manifest: dict) -> str:
    """What this run embedded, and at what rate: no rate where it embedded nothing (0.0 images/s reads as a fault)."""
    t = manifest["totals"]
    if t["computed"]:
        return (f"{t['embedded_this_run']} images in {t['wall_seconds']} s ({t['images_per_second']} images/s "
                "overall; the table's images/s count embedding time only, without model loading)")
    failed = len(manifest["failed_shards"])
    if failed:
        return (f"nothing embedded: {failed} shard(s) failed"
                + ("; every other output was already finished" if t["shards"] else ""))
    return "nothing to embed: every output was already finished"


def markdown_summary(manifest: dict, rows: list[dict]) -> str:
    """The flow run's summary artifact, bounded as the terminal's is (SUMMARY_ROWS, SUMMARY_CAUSES): every shard is
    in the `shards` table artifact and the manifest. Names and reasons are escaped (MARKDOWN): a shard's name holding
    `|` keeps the table's columns, and reads as it is."""
    t = manifest["totals"]
    lines = [
        f"## Embedded {t['shards']} shard(s): {t['computed']} computed, {t['cached']} cached",
        "",
        f"- model: {describe_model(manifest, MARKDOWN)}",
        f"- rows: {t['rows']}, embedded: {t['embedded_rows']}, without embedding: {t['failed_rows']}",
        f"- this run: {this_run_in_words(manifest)}",
        f"- output: {md_code(manifest['output'])}",
    ]
    # the fidelity line names keys, shards and reasons; the GPU line's own backquotes are markup
    for line in (describe_earlier_runs(manifest), fidelity.describe(manifest.get("fidelity"))):
        if line:
            lines.append(f"- {md_text(line)}")
    gpu_use = describe_gpu_use(manifest)
    if gpu_use:
        lines.append(f"- {gpu_use}")
    everywhere = "the `shards` table artifact and `_manifest.json`"
    causes = failure_causes(manifest["failed_shards"])
    if causes:
        lines += ["", "### Failed shards", ""]
        lines += [f"- {len(c.shards)} shard(s) ({name_shards(c.shards, MARKDOWN)}): {c.words(MARKDOWN)}"
                  for c in causes[:SUMMARY_CAUSES]]
        if len(causes) > SUMMARY_CAUSES:
            lines.append(f"- {more_causes(causes)}: every shard's reason is in {everywhere}")
    without = describe_rows_without_embedding(manifest, MARKDOWN)
    if without:
        lines += ["", "### Rows without embedding, by cause", ""] + [f"- {line}" for line in without]
    warned = warning_causes(this_run_shards(manifest))
    if warned:
        lines += ["", "### Shards with warnings (output written)", ""]
        lines += [f"- {describe_warning(c, MARKDOWN)}" for c in warned[:SUMMARY_CAUSES]]
        if len(warned) > SUMMARY_CAUSES:
            lines.append(f"- {more_causes(warned)}: every shard's warnings are in `_manifest.json`")
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join("-" if row[c] is None else md_cell(row[c]) for c in TABLE_COLUMNS) + " |"
              for row in rows[:SUMMARY_ROWS]]
    if len(rows) > SUMMARY_ROWS:
        lines += ["", f"... and {len(rows) - SUMMARY_ROWS:,} more shard(s): every one is in {everywhere}"]
    return "\n".join(lines)


def describe_rows_without_embedding(manifest: dict, style: Style = PLAIN) -> list[str]:
    """The summaries' lines on why rows have no embedding (rows_without_embedding), bounded as theirs are, in
    `style`; none where every row has one."""
    without = manifest.get("rows_without_embedding") or {}
    if not (without.get("causes") or without.get("unrecorded")):
        return []
    lines = [f"{c['rows']:,} row(s) in {c['shards']:,} shard(s): {style.text(c['reason'])} (e.g. shard "
             f"{style.name(c['example']['shard'])}, key {style.name(c['example']['key'])})"
             for c in without["causes"][:SUMMARY_CAUSES]]
    left = without["causes"][SUMMARY_CAUSES:]
    more = len(left) + without["other_causes"]["causes"]
    if more:
        rows = sum(c["rows"] for c in left) + without["other_causes"]["rows"]
        lines.append(f"... and {more:,} more cause(s), of {rows:,} row(s)")
    if without.get("unrecorded"):
        lines.append(f"{without['unrecorded']:,} row(s) whose causes their shards' results do not list")
    column = (manifest.get("config") or {}).get("error_column", "embedding_error")
    return lines + [f"every row's reason is in its output's {style.name(column)} column"]


@dataclass
class Cause:
    """One cause over the shards it hit, most often a failure's: `reason` in the first shard's own words; `alike`:
    another shard's words differ from these, in what names that shard alone (its name, in its paths; numbers: a
    key, a byte offset, a value)."""

    shards: list[str]
    reason: str
    alike: bool = False

    def words(self, style: Style = PLAIN) -> str:
        """The reason; where the shards' words differ, said as the first shard's: 'e.g. 00001: ...'."""
        reason = style.text(self.reason)
        return f"e.g. {style.name(self.shards[0])}: {reason}" if self.alike else reason


# A number: a key, a count, a byte offset, a value (1.3091e+06).
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _without_shard(stem: str, reason: str) -> str:
    """The reason without what names its one shard: the shard's name where it stands as a name (in its paths, not
    inside a longer name) and every number. Two shards whose reasons are equal so are one cause."""
    named = re.sub(rf"(?<![A-Za-z0-9_.-]){re.escape(stem)}(?![A-Za-z0-9-])", "<shard>", reason)
    return _NUMBER.sub("#", named)


def by_cause(said: Iterable[tuple[str, str]]) -> list[Cause]:
    """(shard, reason) pairs grouped by cause (_without_shard), most shards first: a cause shared by many shards
    is said once, with a count and a few of its shards' names."""
    causes: dict[str, Cause] = {}
    for stem, reason in sorted(said):
        cause = causes.setdefault(_without_shard(stem, reason), Cause([], reason))
        if stem not in cause.shards:  # a shard's own alike warnings (damage at two offsets) count it once
            cause.shards.append(stem)
            cause.alike |= reason != cause.reason
    return sorted(causes.values(), key=lambda c: (-len(c.shards), c.shards[0]))


# The most causes a shard's result keeps of its rows without an embedding, and the keys named for each.
ROW_CAUSES_KEPT = 10
ROW_KEYS_NAMED = 3


def row_causes(stem: str, keys: list, reasons: list[str], kept: int = ROW_CAUSES_KEPT) -> list[dict]:
    """Why a shard's rows have no embedding, by cause (reasons alike but for their numbers: a size, an HTTP code, an
    offset), most rows first, the first `kept` of them: the first row's reason, how many rows, a few of their keys."""
    causes: dict[str, dict] = {}
    for key, reason in zip(keys, reasons):
        cause = causes.setdefault(_without_shard(stem, reason), {"reason": reason, "rows": 0, "keys": []})
        cause["rows"] += 1
        if len(cause["keys"]) < ROW_KEYS_NAMED:
            cause["keys"].append(None if key is None else str(key))
    return sorted(causes.values(), key=lambda c: -c["rows"])[:kept]


def describe_row_causes(result: dict, shown: int = 3) -> str:
    """A shard's rows without an embedding, by cause, in a few words: '1: HTTP Error 404: Not Found (000000006); 2:
    truncated JPEG ... (000000004, 000000005)', then how many rows other causes cost; '' where it has none."""
    causes = result.get("error_causes") or []
    said = [f"{c['rows']}: {c['reason']} ({', '.join(str(k) for k in c['keys'])})" for c in causes[:shown]]
    others = result["failed"] - sum(c["rows"] for c in causes[:shown])
    if others > 0:
        said.append(f"{others} of other causes" if causes else f"{others} of causes not recorded")
    return "; ".join(said)


def rows_without_embedding(results: list[dict], kept: int = 20) -> dict:
    """The rows without an embedding of this run's shards, by cause over all of them, most rows first (the first
    `kept` causes): the first shard's reason, how many rows and shards, a shard and key to look at; `unrecorded`:
    rows of shards whose outputs do not say why (written by earlier versions, or beyond the causes each keeps)."""
    causes: dict[str, dict] = {}
    unrecorded = 0
    for r in sorted(results, key=lambda r: r["stem"]):
        said = r.get("error_causes") or []
        unrecorded += r.get("failed", 0) - sum(c["rows"] for c in said)
        for c in said:
            cause = causes.setdefault(_without_shard(r["stem"], c["reason"]),
                                      {"reason": c["reason"], "rows": 0, "shards": 0, "example": None})
            cause["rows"] += c["rows"]
            cause["shards"] += 1
            cause["example"] = cause["example"] or {"shard": r["stem"], "key": (c["keys"] or [None])[0]}
    ranked = sorted(causes.values(), key=lambda c: (-c["rows"], -c["shards"]))
    left = ranked[kept:]
    return {"causes": ranked[:kept], "other_causes": {"causes": len(left), "rows": sum(c["rows"] for c in left)},
            "unrecorded": unrecorded}


def failure_causes(failed_shards: dict[str, str]) -> list[Cause]:
    """The failed shards' reasons, by cause (by_cause), most shards first."""
    return by_cause(failed_shards.items())


def warning_causes(shards: dict[str, dict]) -> list[Cause]:
    """The finished shards' warnings (their outputs written), by cause, most shards first."""
    return by_cause((stem, warning) for stem, s in shards.items() for warning in s.get("warnings") or [])


def describe_warning(cause: Cause, style: Style = PLAIN) -> str:
    if len(cause.shards) == 1:
        return f"shard {style.name(cause.shards[0])}: {style.text(cause.reason)}"
    return f"{len(cause.shards)} shard(s) ({name_shards(cause.shards, style)}): {cause.words(style)}"


def name_shards(stems: list[str], style: Style = PLAIN, shown: int = SHARDS_NAMED) -> str:
    """A few shards by name, then how many more: 'a, b, c, d, e and 95 more'."""
    named = ", ".join(style.name(stem) for stem in stems[:shown])
    return named + (f" and {len(stems) - shown:,} more" if len(stems) > shown else "")


def more_causes(causes: list[Cause], shown: int = SUMMARY_CAUSES) -> str:
    """What the summaries leave out past their first `shown` causes: '... and 3 more cause(s), of 12 shard(s)'."""
    left = causes[shown:]
    return f"... and {len(left):,} more cause(s), of {len({s for c in left for s in c.shards}):,} shard(s)"


def describe_recomputed(why: dict[str, str], shown: int = SUMMARY_CAUSES) -> list[str]:
    """Why outputs already there are recomputed (caching.planned_outputs), one line per cause, bounded as the
    summaries are: '4 shard(s) to recompute: their outputs were made with autocast=True (now False): 00000, ...'."""
    causes = by_cause(why.items())
    lines = [f"{len(c.shards):,} shard(s) to recompute: {c.words()}: {name_shards(c.shards)}" for c in causes[:shown]]
    return lines + ([f"{more_causes(causes, shown)} to recompute"] if len(causes) > shown else [])


def describe_failures(failed_shards: dict[str, str], shown: int = SUMMARY_CAUSES) -> str:
    """The failed shards' reasons in one line, by cause and bounded (a failed run's message, which Prefect logs and
    shows): '00000, 00001: reason; 00002: e.g. ...'."""
    causes = failure_causes(failed_shards)
    said = "; ".join(f"{name_shards(c.shards)}: {c.words()}" for c in causes[:shown])
    return said + (f"; {more_causes(causes, shown)}" if len(causes) > shown else "")
