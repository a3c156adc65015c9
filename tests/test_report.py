"""The manifest's per-shard figures: images/s over embedding time only, and a cached re-run that keeps them."""
from __future__ import annotations

import json

from wdsembed import report
from wdsembed.config import EmbedConfig


def shard(stem: str, *, cached: bool = False, key: str = "key-a", seconds: float = 100.0) -> dict:
    # 50 images embedded in 2 s of a 100 s task whose first 97 s loaded the model
    start = 1_000_000.0
    return {"stem": stem, "output": f"out/{stem}.parquet", "rows": 52, "samples": 50, "embedded": 50, "failed": 2,
            "cache_key": key, "cached": cached, "seconds": 0.0 if cached else seconds,
            "images_per_second": 0.0 if cached else 0.5, "batch_size": 4, "warnings": [],
            "timeline": {"start": start, "embed_start": start + 97, "embed_end": start + 99, "end": start + seconds}}


def test_rate_counts_embedding_time_only(tmp_path):
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    manifest = report.build_manifest(config, [shard("00000")], {}, 100.0)
    figures = manifest["shards"]["00000"]
    assert figures["seconds"] == 100.0 and figures["embed_seconds"] == 2.0
    assert figures["images_per_second"] == 25.0  # not 0.5: the model load is not embedding
    # without a timeline (an older result): the whole task's rate, as before
    old = shard("00001") | {"timeline": {}}
    assert report.build_manifest(config, [old], {}, 1.0)["shards"]["00001"]["images_per_second"] == 0.5


def test_cached_rerun_keeps_the_figures_of_the_run_that_computed(tmp_path):
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    first = report.build_manifest(config, [shard("00000"), shard("00001")], {}, 100.0)
    report.write_manifest(config, first)

    again = [shard("00000", cached=True), shard("00001", cached=True, key="key-b")]  # 00001: other inputs since
    second = report.build_manifest(config, again, {}, 0.5)
    assert {k: second["shards"]["00000"][k] for k in ("seconds", "embed_seconds", "images_per_second", "status")} \
        == {"seconds": 100.0, "embed_seconds": 2.0, "images_per_second": 25.0, "status": "cached"}
    assert second["shards"]["00000"]["timeline"] == first["shards"]["00000"]["timeline"]
    # no figures known for it: null, never a made-up 0
    assert second["shards"]["00001"]["seconds"] is None and second["shards"]["00001"]["images_per_second"] is None
    assert second["totals"]["embedded_this_run"] == 0  # this run embedded nothing, and says so
    json.dumps(second)

    # a third run, cached again, still has them (carried from a manifest that itself carried them)
    report.write_manifest(config, second)
    third = report.build_manifest(config, [shard("00000", cached=True)], {}, 0.5)
    assert third["shards"]["00000"]["images_per_second"] == 25.0

    rows = report.shard_rows(again, {}, second)
    assert [(r["seconds"], r["images_per_second"]) for r in rows] == [(100.0, 25.0), (None, None)]
    text = report.markdown_summary(second, rows)
    assert "| 00000 | 52 | 50 | 2 | cached | 100.0 | 25.0 |" in text and "| 00001 | 52 | 50 | 2 | cached | - | - |" in text


def test_a_run_that_writes_shards_removes_the_previous_manifest_first_and_keeps_its_figures(tmp_path):
    """A run that will write any shard removes the manifest before its first write (a run killed after it would
    otherwise leave one describing outputs it replaced); the shards of the removed manifest still give the cached
    shards their figures. A run that writes nothing keeps it."""
    from wdsembed.shard import ShardPlan

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    manifest_path = tmp_path / "out" / "_manifest.json"
    first = report.build_manifest(config, [shard("00000"), shard("00001")], {}, 100.0)
    report.write_manifest(config, first)
    plans = [ShardPlan(shard=f"in/{s}.tar", stem=s, fingerprint="f", rows=None, index=None, output=f"out/{s}.parquet")
             for s in ("00000", "00001")]

    assert report.retire_manifest(config, plans, {"00000", "00001"}) == first["shards"]  # nothing to write
    assert manifest_path.exists()
    previous = report.retire_manifest(config, plans, {"00000"})  # 00001 will be written
    assert previous == first["shards"] and not manifest_path.exists()
    second = report.build_manifest(config, [shard("00000", cached=True), shard("00001")], {}, 100.0, None,
                                   previous)
    assert second["shards"]["00000"]["images_per_second"] == 25.0  # carried, though the file is gone
    report.write_manifest(config, second)
    forced = EmbedConfig(input=config.input, output=config.output, force=True)
    assert report.retire_manifest(forced, plans, set()) == second["shards"] and not manifest_path.exists()
    assert report.retire_manifest(config, plans, set()) == {}  # none left: nothing to carry, nothing to remove


def test_failures_grouped_by_reason(tmp_path):
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    failures = {"00000": "OSError: disk full", "00002": "OSError: disk full", "00001": "KilledWorker: gone"}
    manifest = report.build_manifest(config, [], failures, 1.0)
    text = report.markdown_summary(manifest, report.shard_rows([], failures))
    assert "- 2 shard(s) (`00000`, `00002`): OSError: disk full" in text
    assert "- 1 shard(s) (`00001`): KilledWorker: gone" in text


def test_a_cause_shared_by_many_shards_is_said_once_though_each_reason_names_its_shard(tmp_path, capsys):
    """A reason names its own shard (its paths, a key, a value): 5,000 shards that failed for one cause were 5,000
    causes, each a line of the summaries and a part of the failed run's one-line message. Grouped now: one line
    with a count, a few of the shards, and the first shard's own words as the example."""
    from wdsembed.cli import print_summary
    from wdsembed.shard import ShardsFailed

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    failures = {f"{i:05d}": f"ValueError: shard /in/{i:05d}.tar: key '{i:05d}0002' has an embedding value of "
                            f"{1.2e6 + i:g}, beyond float16's largest (65504)" for i in range(1, 5001)}
    failures |= {"99998": "KilledWorker: worker died", "99999": "KilledWorker: worker died"}
    manifest = report.build_manifest(config, [shard("00000")], failures, 1.0) | {"path": "m.json"}
    example = failures["00001"]

    print_summary(manifest)
    said = capsys.readouterr().out
    assert said.count("shard(s) failed (") == 2, said
    assert f"(1) 5000 shard(s) failed (00001, 00002, 00003, 00004, 00005 and 4,995 more): e.g. 00001: {example}" \
        in said, said
    assert "(2) 2 shard(s) failed (99998, 99999): KilledWorker: worker died" in said  # equal words: no example
    text = report.markdown_summary(manifest, report.shard_rows([], failures))
    assert f"- 5000 shard(s) (`00001`, `00002`, `00003`, `00004`, `00005` and 4,995 more): e.g. `00001`: {example}" \
        in text, text[:3000]
    message = str(ShardsFailed(failures, total=5003))
    assert message == (f"5002 of 5003 shard(s) failed: 00001, 00002, 00003, 00004, 00005 and 4,995 more: e.g. 00001: "
                       f"{example}; 99998, 99999: KilledWorker: worker died")
    # Reasons of another shape stay causes of their own.
    assert len(report.failure_causes({"00001": "ValueError: id column 'key' is not in /in/00001.parquet",
                                      "00002": "ValueError: id column 'uid' is not in /in/00002.parquet"})) == 2


def test_why_outputs_are_recomputed_is_said_by_cause_in_a_bounded_number_of_lines():
    """2,000 touched tars and a few other causes: a line per cause, a few shards named in each, the rest counted."""
    why = {f"{i:05d}": "their tars changed since (mtime)" for i in range(2000)}
    why |= {f"9000{i}": f"their outputs were made with model_name={name} (now b)" for i, name in enumerate("cdefgh")}
    lines = report.describe_recomputed(why)
    assert lines[0] == ("2,000 shard(s) to recompute: their tars changed since (mtime): 00000, 00001, 00002, 00003, "
                        "00004 and 1,995 more")
    assert lines[1] == "1 shard(s) to recompute: their outputs were made with model_name=c (now b): 90000"
    assert len(lines) == report.SUMMARY_CAUSES + 1
    assert lines[-1] == "... and 2 more cause(s), of 2 shard(s) to recompute"


def test_the_summaries_of_a_run_of_thousands_of_shards_fit_one_screen(tmp_path, capsys):
    """2,000 shards printed 2,000 table rows; as many causes of failure, a line each. The terminal's summary and the
    markdown artifact list the first shards and causes, then say how many more and where every one is (the
    manifest; the table artifact, which keeps a row per shard)."""
    from wdsembed.cli import print_summary

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    results = [shard(f"{i:05d}") | {"warnings": [f"damaged at byte {i}"] * (i < 30)} for i in range(2000)]
    failures = {f"{i:05d}": f"Error{'x' * i}: broken" for i in range(2000, 2040)}  # 40 causes of their own
    manifest = report.build_manifest(config, results, failures, 1.0) | {"path": "OUT/_manifest.json"}

    print_summary(manifest)
    said = capsys.readouterr().out.splitlines()
    assert len(said) <= 50, "\n".join(said)
    everywhere = "OUT/_manifest.json and the flow run's 'shards' table artifact"
    assert f"... and 2,020 more shard(s): every one is in {everywhere}" in said, said
    assert sum(line.startswith("│ 0") for line in said) == report.SUMMARY_ROWS
    assert f"... and 35 more cause(s), of 35 shard(s): every shard's reason is in {everywhere}" in said, said
    assert "warning: 30 shard(s) (00000, 00001, 00002, 00003, 00004 and 25 more): e.g. 00000: damaged at byte 0" \
        in said, said

    rows = report.shard_rows(results, failures, manifest)
    assert len(rows) == 2040  # the table artifact: every shard
    text = report.markdown_summary(manifest, rows).splitlines()
    assert len(text) <= 50, "\n".join(text)
    assert "... and 2,020 more shard(s): every one is in the `shards` table artifact and `_manifest.json`" in text
    assert "- ... and 35 more cause(s), of 35 shard(s): every shard's reason is in the `shards` table artifact and " \
        "`_manifest.json`" in text, text


def test_a_manifest_reads_as_one_line_and_is_the_same_dict_everywhere_else(tmp_path):
    """A notebook cell ending in `flows.embed.run(...)` printed the manifest whole: every shard's entry, tens of
    thousands of lines at scale. Its repr is one line of counts now; as a dict it is what it was (indexing, ==,
    JSON, pickling through Prefect's results and Dask)."""
    import copy
    import pickle
    import pprint

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    results = [shard(f"{i:05d}", cached=i < 10) for i in range(10_000)]
    failures = {f"{i:05d}": "ValueError: broken" for i in range(10_000, 10_003)}
    manifest = report.build_manifest(config, results, failures, 12.5)
    manifest["path"] = report.write_manifest(config, manifest)
    said = repr(manifest)
    assert said == (f"Manifest(output={str(tmp_path / 'out')!r}, shards=10000, computed=9990, cached=10, "
                    "failed_shards=3, rows=520000, embedded_rows=500000, failed_rows=20000, wall_seconds=12.5, "
                    f"path={str(tmp_path / 'out' / '_manifest.json')!r})")
    assert pprint.pformat(manifest) == said and str(manifest) == said

    class Printer:  # IPython's pretty printer, as a notebook cell's value is shown
        def text(self, text):
            self.said = text

    printer = Printer()
    manifest._repr_pretty_(printer, False)
    assert printer.said == said

    assert isinstance(manifest, dict) and manifest == dict(manifest)
    assert json.dumps(manifest, default=str) == json.dumps(dict(manifest), default=str)
    written = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert written | {"path": manifest["path"]} == json.loads(json.dumps(manifest, default=str))
    for again in (pickle.loads(pickle.dumps(manifest)), copy.deepcopy(manifest)):
        assert type(again) is report.Manifest and again == manifest and repr(again) == said
    assert manifest["shards"]["00000"]["status"] == "cached" and len(manifest["shards"]) == 10_000

    # OUTPUT holding earlier runs' shards says so; a manifest not written has no path
    for i in range(3):
        (tmp_path / "out" / f"{i:05d}.parquet").touch()
    previous = report.earlier_shards(config, {"00000"})
    rerun = report.build_manifest(config, [shard("00000", cached=True)], {}, 0.5, None, previous)
    assert repr(rerun).endswith("shards=1, computed=0, cached=1, failed_shards=0, earlier_run=2, rows=52, "
                                "embedded_rows=50, failed_rows=2, wall_seconds=0.5)"), repr(rerun)


def test_summary_title_counts_the_failed_shards_too(tmp_path, capsys):
    """Its table has a row per shard, failed ones included: so has its title's total (it read '2 shard(s): 2
    computed, 0 cached, 1 failed' above 3 rows)."""
    from wdsembed.cli import print_summary

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    failures = {"00001": "MalformedShardError: 00001.tar: not a tar file"}
    manifest = report.build_manifest(config, [shard("00000"), shard("00002")], failures, 1.0) | {"path": "m.json"}
    print_summary(manifest)
    said = capsys.readouterr().out
    assert "3 shard(s): 2 computed, 0 cached, 1 failed" in said, said
    print_summary(report.build_manifest(config, [shard("00000")], {}, 1.0) | {"path": "m.json"})
    assert capsys.readouterr().out.splitlines()[0].strip() == "1 shard(s): 1 computed, 0 cached"  # none failed


def test_the_summaries_list_this_runs_shards_and_say_what_output_holds_beside_them(tmp_path, capsys):
    """A run that names some of OUTPUT's shards keeps the others' entries in its manifest (EARLIER_RUN); its
    summaries still list and count its own shards, the failed ones included, and say in one line what OUTPUT holds
    besides. An earlier run's warnings were said by that run, not again."""
    from wdsembed.cli import print_summary

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    first = report.build_manifest(config, [shard(f"{i:05d}") | {"warnings": ["damaged"] * (i == 3)}
                                           for i in range(4)], {}, 100.0)
    report.write_manifest(config, first)
    for i in range(4):
        (tmp_path / "out" / f"{i:05d}.parquet").touch()
    previous = report.earlier_shards(config, {"00000", "00001"})
    failures = {"00001": "MalformedShardError: 00001.tar: not a tar file"}
    manifest = report.build_manifest(config, [shard("00000", cached=True)], failures, 1.0, None, previous) \
        | {"path": "m.json"}
    assert {s: e["status"] for s, e in manifest["shards"].items()} == {
        "00000": "cached", "00002": report.EARLIER_RUN, "00003": report.EARLIER_RUN}
    assert list(report.this_run_shards(manifest)) == ["00000"]

    print_summary(manifest)
    said = capsys.readouterr().out
    assert "2 shard(s): 0 computed, 1 cached, 1 failed" in said and "00002" not in said and "damaged" not in said
    line = "output holds 3 finished shard(s), 150 of 156 rows embedded: 2 of them from earlier runs"
    assert line in " ".join(said.split()), said
    text = report.markdown_summary(manifest, report.shard_rows([shard("00000", cached=True)], failures, manifest))
    assert f"- {line}" in text and "00002" not in text and "damaged" not in text, text


def test_a_run_where_no_shard_finished_names_its_model_without_nones(tmp_path, capsys):
    """Every shard failed: no shard recorded the model, so the summaries name the model the run was given and say
    why nothing more is known (they used to print "model None (None), None embedding, None dims")."""
    from wdsembed.cli import print_summary

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name="resnet18.a1_in1k")
    manifest = report.build_manifest(config, [], {"00000": "ValueError: bad"}, 1.0) | {"path": "m.json"}
    said = "resnet18.a1_in1k (no shard finished: weights, embedding and dimensions unknown)"
    assert f"- model: `resnet18.a1_in1k` (no shard finished" in report.markdown_summary(manifest, [])
    print_summary(manifest)
    out = capsys.readouterr().out
    assert f"model {said} | 0 of 0 rows embedded" in " ".join(out.split()) and "None" not in out
    finished = report.build_manifest(config, [shard("00000") | {"model": {
        "name": "resnet18.a1_in1k", "weights": "random-init", "embedding": "pooled", "dim": 512}}], {}, 1.0)
    assert report.describe_model(finished) == "resnet18.a1_in1k (random-init), pooled embedding, 512 dimensions"


def test_rows_with_an_embedding_are_counted_as_rows_and_images_as_images(tmp_path, capsys):
    """A parquet that repeats a key: its 4 rows all have an embedding, from 3 images (a real shard's figures:
    tests/test_reliability.py, test_parquet_that_repeats_a_key). The summaries said '3 of 4 rows embedded' and the
    totals rows 4, embedded 3, failed_rows 0: images over rows."""
    from wdsembed.cli import print_summary

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    repeats = shard("00000") | {"rows": 4, "samples": 3, "embedded": 3, "failed": 0}
    manifest = report.build_manifest(config, [repeats, shard("00001")], {}, 2.0) | {"path": "m.json"}
    print_summary(manifest)
    said = " ".join(capsys.readouterr().out.split())
    assert "| 54 of 56 rows embedded | 53 images this run" in said, said
    assert "│ 00000 │ 4 │ 4 │ 0 │ computed │" in said, said
    rows = report.shard_rows([repeats], {}, manifest)
    assert (rows[0]["rows"], rows[0]["embedded"], rows[0]["failed"]) == (4, 4, 0)
    text = report.markdown_summary(manifest, rows)
    assert "- rows: 56, embedded: 54, without embedding: 2" in text and "- this run: 53 images in" in text
    t = manifest["totals"]
    assert (t["rows"], t["embedded_rows"], t["failed_rows"]) == (56, 54, 2)  # rows = with + without an embedding
    assert (t["embedded"], t["embedded_this_run"]) == (53, 53)  # images
    entry = manifest["shards"]["00000"]  # each shard's entry says both, so that a script summing them need not derive
    assert (entry["rows"], entry["embedded_rows"], entry["embedded"], entry["failed"]) == (4, 4, 3, 0)


def test_the_summarys_last_line_names_output_and_manifest_on_one_line_however_long(tmp_path, capsys):
    """A script reads the summary's last line, `output: OUTPUT  (manifest: PATH)` (README); rich wrapped it at 80
    columns where stdout is not a terminal, so a long OUTPUT put the manifest's path on a line of its own."""
    from wdsembed.cli import print_summary

    out = tmp_path / ("a-long-folder-name-" * 4) / "out"
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(out))
    manifest = report.build_manifest(config, [shard("00000")], {}, 2.0) | {"path": str(out / "_manifest.json")}
    print_summary(manifest)
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last == f"output: {out}  (manifest: {out / '_manifest.json'})", last


def gpu_shard(stem: str, worker: str, gpu: str, start: float, end: float, embedded: int, alone: float) -> dict:
    t = {"worker": worker, "gpu": gpu, "model_alone_images_per_second": alone, "start": start - 1,
         "embed_start": start, "embed_end": end, "end": end + 1}
    return shard(stem) | {"embedded": embedded, "timeline": t}


def test_gpu_use_sets_the_rate_the_shards_fed_the_model_against_its_own_and_advises_where_the_input_held_it_back(
        tmp_path, capsys):
    """Per worker, its images over the union of its shards' embedding spans (they overlap at shard boundaries),
    summed over the GPUs, against the model's own rate on each; the summaries say it, and where the input held the
    model back, what may help."""
    from wdsembed.cli import print_summary

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    # worker a: 3 shards of 10,000 in 0-12 s (the second's span begins inside the first's) at 2,500/s of 4,000 alone;
    # worker b on another GPU: 20,000 in 10-20 s, 2,000/s of 4,000
    results = [gpu_shard("00000", "h:1", "GPU-a", 0, 5, 10_000, 4000),
               gpu_shard("00001", "h:1", "GPU-a", 4, 8, 10_000, 4000),
               gpu_shard("00002", "h:1", "GPU-a", 8, 12, 10_000, 4000),
               gpu_shard("00003", "h:2", "GPU-b", 10, 20, 20_000, 4000),
               shard("00004", cached=True)]
    manifest = report.build_manifest(config, results, {}, 25.0) | {"path": "m.json"}
    assert manifest["gpu_use"] == {"gpus": 2, "workers": 2, "model_alone_images_per_second": 8000,
                                   "fed_images_per_second": 4500, "ratio": 0.562, "embedding_seconds": 10}
    line = report.describe_gpu_use(manifest)
    assert line.startswith("GPU use: the shards fed the model 4,500 images/s, 0.56 of the 8,000 it runs alone "
                           "on 2 GPUs")
    assert "held the model back" in line and "--workers-per-gpu 2" in line
    assert f"- {line}" in report.markdown_summary(manifest, report.shard_rows(results, {}, manifest))
    print_summary(manifest)
    assert line in " ".join(capsys.readouterr().out.split())
    json.dumps(manifest)

    # already two workers per GPU in the config: the figure, no advice to do what the run did
    two = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), workers_per_gpu=2)
    line = report.describe_gpu_use(report.build_manifest(two, results, {}, 25.0))
    assert "held the model back" in line and "workers-per-gpu" not in line
    # on a cluster the run did not start, workers_per_gpu does nothing: the advice is for the cluster
    shared = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), dask_address="tcp://h:8786")
    line = report.describe_gpu_use(report.build_manifest(shared, results, {}, 25.0))
    assert "workers-per-gpu" not in line and "`dask cuda worker` started twice on each node" in line, line
    # fed at 0.9 of the model's rate: said, nothing to advise
    fast = [gpu_shard("00000", "h:1", "GPU-a", 0, 10, 36_000, 4000)]
    assert report.describe_gpu_use(report.build_manifest(config, fast, {}, 11.0)) == (
        "GPU use: the shards fed the model 3,600 images/s, 0.90 of the 4,000 it runs alone on its GPU")
    # too short a span to tell the host from the pipeline's start: in the manifest, not in the summary
    short = report.build_manifest(config, [gpu_shard("00000", "h:1", "GPU-a", 0, 2, 1_000, 4000)], {}, 3.0)
    assert short["gpu_use"]["embedding_seconds"] == 2 and report.describe_gpu_use(short) is None
    # two workers on one GPU timed the model while sharing it: the rate they fed it together, without a ratio
    shared = [gpu_shard("00000", "h:1", "GPU-a", 0, 10, 10_000, 4000),
              gpu_shard("00001", "h:2", "GPU-a", 0, 10, 10_000, 2100)]
    both = report.build_manifest(two, shared, {}, 11.0)
    assert both["gpu_use"] == {"gpus": 1, "workers": 2, "model_alone_images_per_second": None,
                               "fed_images_per_second": 2000, "ratio": None, "embedding_seconds": 10}
    assert report.describe_gpu_use(both) == ("GPU use: the shards fed the model 2,000 images/s on its GPU, from 2 "
                                             "workers (the model's own rate is not timed where workers share a GPU)")
    four = shared + [gpu_shard("00002", "h:3", "GPU-b", 0, 10, 10_000, 4000),
                     gpu_shard("00003", "h:4", "GPU-b", 0, 10, 10_000, 4000)]
    assert report.describe_gpu_use(report.build_manifest(two, four, {}, 11.0)) == (
        "GPU use: the shards fed the model 4,000 images/s on 2 GPUs, 2 workers on each (the model's own rate is not "
        "timed where workers share a GPU)")
    # the CPU (no figures): nothing
    assert report.build_manifest(config, [shard("00000")], {}, 100.0)["gpu_use"] is None


def test_totals_split_computed_from_cached_and_count_the_shards_with_warnings():
    warned = shard("00001") | {"warnings": ["00001: 2 rows name keys the tar lacks"]}
    kept = {"00009": shard("00009") | {"rows": 10, "embedded": 10, "failed": 0}}
    totals = report.totals([shard("00000"), warned, shard("00002", cached=True)], 4.0, kept)
    assert (totals["shards"], totals["computed"], totals["cached"]) == (3, 2, 1)
    assert totals["shards_with_warnings"] == 1
    # the rate is this run's embedding over its wall time: a cached shard's images were embedded by another run
    assert totals["embedded_this_run"] == 100 and totals["images_per_second"] == 25.0
    assert (totals["rows"], totals["embedded"], totals["embedded_rows"], totals["failed_rows"]) == (156, 150, 150, 6)
    assert totals["in_output"] == {"shards": 4, report.EARLIER_RUN: 1, "rows": 166, "embedded": 160,
                                   "embedded_rows": 160, "failed_rows": 6}
    assert report.totals([], 0.0)["images_per_second"] == 0.0


def test_rows_without_an_embedding_are_said_by_cause_with_a_shard_and_key_to_look_at(tmp_path, capsys):
    """A run's summary said how many rows had no embedding, never why: the reasons (failed downloads, cut images)
    were in each output's error column alone. Each shard's result now keeps them by cause (alike but for their
    numbers: sizes, codes), and the summary says them over the run, most rows first, with a shard and key to read."""
    cut = "truncated JPEG (no end-of-image marker, {} bytes): not decoded"
    causes = report.row_causes("00000", ["k1", "k2", "k3", "k4", 5],
                               ["HTTP Error 404: Not Found", cut.format(2181), "HTTP Error 404: Not Found",
                                cut.format(977), "HTTP Error 404: Not Found"])
    assert causes == [{"reason": "HTTP Error 404: Not Found", "rows": 3, "keys": ["k1", "k3", "5"]},
                      {"reason": cut.format(2181), "rows": 2, "keys": ["k2", "k4"]}]
    assert report.describe_row_causes({"failed": 6, "error_causes": causes}, shown=1) == \
        "3: HTTP Error 404: Not Found (k1, k3, 5); 3 of other causes"

    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    results = [shard("00000") | {"failed": 5, "error_causes": causes},
               shard("00001") | {"failed": 1, "error_causes": [{"reason": cut.format(12), "rows": 1, "keys": ["x"]}]},
               shard("00002") | {"failed": 2}]  # an output of an earlier version: its causes unknown
    manifest = report.build_manifest(config, results, {}, 1.0)
    without = manifest["rows_without_embedding"]
    assert [(c["rows"], c["shards"], c["example"]) for c in without["causes"]] == [
        (3, 2, {"shard": "00000", "key": "k2"}), (3, 1, {"shard": "00000", "key": "k1"})]
    assert without["unrecorded"] == 2
    text = report.markdown_summary(manifest, report.shard_rows(results, {}, manifest))
    assert "### Rows without embedding, by cause" in text
    assert f"- 3 row(s) in 2 shard(s): {cut.format(2181)} (e.g. shard `00000`, key `k2`)" in text, text
    assert "- 3 row(s) in 1 shard(s): HTTP Error 404: Not Found (e.g. shard `00000`, key `k1`)" in text, text
    assert "- 2 row(s) whose causes their shards' results do not list" in text, text
    assert "every row's reason is in its output's `embedding_error` column" in text

    from wdsembed.cli import print_summary

    print_summary(manifest)
    assert f"without embedding: 3 row(s) in 2 shard(s): {cut.format(2181)} (e.g. shard 00000, key k2)" in \
        capsys.readouterr().out.splitlines()


def test_the_artifact_gives_no_rate_for_a_run_that_embedded_nothing(tmp_path):
    """The flow run's summary artifact said '- this run: 0 images in 0.5 s (0.0 images/s overall ...)' for a re-run
    whose only work failed again, or that had nothing to do: a rate of 0.0 reads as a fault. It says what happened,
    as the terminal's summary does; a run that embedded keeps its rate."""
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    failures = {"00001": "ValueError: not a tar file"}
    failed_again = report.build_manifest(config, [shard("00000", cached=True)], failures, 0.5)
    text = report.markdown_summary(failed_again, report.shard_rows([shard("00000", cached=True)], failures))
    assert "- this run: nothing embedded: 1 shard(s) failed; every other output was already finished" in text, text
    assert "0.0 images/s" not in text, text

    only_failed = report.build_manifest(config, [], failures, 0.5)
    assert "- this run: nothing embedded: 1 shard(s) failed\n" in report.markdown_summary(only_failed, []) + "\n"

    nothing = report.build_manifest(config, [shard("00000", cached=True)], {}, 0.5)
    text = report.markdown_summary(nothing, report.shard_rows([shard("00000", cached=True)], {}))
    assert "- this run: nothing to embed: every output was already finished" in text and "images/s" not in \
        text.split("- this run:")[1].splitlines()[0], text

    computed = report.build_manifest(config, [shard("00000")], {}, 100.0)
    text = report.markdown_summary(computed, report.shard_rows([shard("00000")], {}))
    assert "- this run: 50 images in 100.0 s (" in text, text


def test_an_entry_kept_from_a_manifest_written_before_embedded_rows_has_them_too(tmp_path):
    """A shard this run does not name keeps its entry from the manifest OUTPUT holds (EARLIER_RUN). One that a
    version before embedded_rows wrote has none: a script summing every entry's `embedded_rows`, as the README
    says each has, failed with KeyError on it."""
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    older = report.build_manifest(config, [shard("00000"), shard("00001") | {"rows": 4, "embedded": 3, "failed": 0}],
                                  {}, 100.0)
    for entry in older["shards"].values():
        del entry["embedded_rows"]  # as that version wrote it
    report.write_manifest(config, older)
    for stem in ("00000", "00001"):
        (tmp_path / "out" / f"{stem}.parquet").touch()
    manifest = report.build_manifest(config, [shard("00002")], {}, 1.0, None, report.earlier_shards(config, {"00002"}))
    assert {s: (e["status"], e["embedded_rows"]) for s, e in manifest["shards"].items()} == {
        "00000": (report.EARLIER_RUN, 50), "00001": (report.EARLIER_RUN, 4), "00002": ("computed", 50)}


# Shard names a file system allows that Markdown or a terminal would read as something else: a table's cell
# boundary, code, emphasis, raw HTML, an entity, a link, a line break, an escape sequence; spaces at a cell's ends.
ODD_NAMES = ["a|b", "c`d``e", "<b>f</b>", "*g*", "_h_", "i&amp;j", "[k](l)", "m\nn", "o\\p", " q ", "\x1b[31mr"]


def odd_manifest(tmp_path, names=ODD_NAMES):
    """A manifest of a run over shards of ODD_NAMES: all but the last finished (each with a warning naming it and a
    row without embedding), the last failed, with a reason naming it."""
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o|u`t"), model_name="resnet18.a1_in1k")
    results = [shard(name) | {"warnings": [f"{name}.tar: a warning of its own"],
                              "error_causes": [{"reason": f"not an image in {name}", "rows": 2, "keys": [name]}]}
               for name in names[:-1]]
    failures = {names[-1]: f"MalformedShardError: {names[-1]}.tar: not a tar file"}
    manifest = report.build_manifest(config, results, failures, 1.0) | {"path": "m.json"}
    return manifest, report.shard_rows(results, failures, manifest)


def rendered(markdown: str) -> tuple[list[list[str]], list[str]]:
    """The summary as a GFM renderer reads it: its table's rows (header first) as their cells' text, and the text of
    its list items; fails where a name turned into markup (emphasis, a link, HTML)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    table, items, row = [], [], None
    for i, token in enumerate(tokens):
        if token.type == "tr_open":
            row = []
            table.append(row)
        elif token.type == "inline":
            kinds = {child.type for child in token.children}
            assert kinds <= {"text", "code_inline", "text_special"}, (kinds, token.content)
            text = "".join(child.content for child in token.children)
            if tokens[i - 1].type in ("th_open", "td_open"):
                row.append(text)
            elif tokens[i - 2].type == "list_item_open":
                items.append(text)
    return table, items


def test_the_markdown_summary_keeps_its_columns_and_every_name_as_it_is(tmp_path):
    """A `|` in a shard's name split its row of the summary's table into more cells than the header's; a backquote
    ended its code span, `*g*` and `<b>` became emphasis and HTML. Names and reasons are escaped: the table keeps its
    seven columns and each name reads as it is; a line break, which no table cell or list item can hold, is written
    as `tar tf` lists it (`\\n`)."""
    manifest, rows = odd_manifest(tmp_path)
    table, items = rendered(report.markdown_summary(manifest, rows))
    assert table[0] == list(report.TABLE_COLUMNS)
    assert all(len(row) == len(report.TABLE_COLUMNS) for row in table), table
    said = {"m\nn": "m\\nn", "\x1b[31mr": "\\033[31mr"}  # a control character as tar lists it
    assert sorted(row[0] for row in table[1:]) == sorted(said.get(name, name) for name in ODD_NAMES)
    failed = next(row for row in table if row[0] == said[ODD_NAMES[-1]])
    assert failed[4] == f"FAILED: MalformedShardError: {said[ODD_NAMES[-1]]}.tar: not a tar file"
    assert f"output: {manifest['output']}" in items
    assert "model: resnet18.a1_in1k (no shard finished: weights, embedding and dimensions unknown)" in items
    assert (f"1 shard(s) ({said[ODD_NAMES[-1]]}): MalformedShardError: {said[ODD_NAMES[-1]]}.tar: not a tar file"
            in items), items
    # the shards' warnings and rows without embedding are one cause each (the reasons differ in the names alone)
    first = sorted(ODD_NAMES[:-1])[0]
    assert f"20 row(s) in 10 shard(s): not an image in {first} (e.g. shard {first}, key {first})" in items, items
    named = ", ".join(said.get(name, name) for name in sorted(ODD_NAMES[:-1])[:5])
    assert f"10 shard(s) ({named} and 5 more): e.g. {first}: {first}.tar: a warning of its own" in items, items
    for name in ODD_NAMES[:-1]:  # each name in a line of its own
        _, items = rendered(report.markdown_summary(*odd_manifest(tmp_path, [name, "x"])))
        name = said.get(name, name)
        assert f"shard {name}: {name}.tar: a warning of its own" in items, (name, items)
        assert f"2 row(s) in 1 shard(s): not an image in {name} (e.g. shard {name}, key {name})" in items, items


def test_markdown_code_spans_and_cells_read_back_as_they_are():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table")
    for name in ["`a", "a`", "` a `", " a ", "``", "a``b`", "|", "\\`"]:
        children = md.parseInline(f"x {report.md_code(name)} y")[0].children
        assert [c.content for c in children if c.type == "code_inline"] == [name], (name, children)
        table, _ = rendered(f"| h |\n|---|\n| {report.md_cell(name)} |\n")
        assert table[1] == [name], (name, table)


def test_the_terminal_summary_keeps_each_name_on_its_row_and_sends_no_escape_sequence(tmp_path, capsys):
    """A shard's name holding a line break split its row of the terminal's table in two, and an escape sequence in
    one coloured the terminal. Names are printed on one line, as `tar tf` lists them; `|`, brackets and backquotes
    as they are."""
    from wdsembed.cli import print_summary

    manifest, _ = odd_manifest(tmp_path)
    print_summary(manifest)
    out = capsys.readouterr().out
    assert "\x1b" not in out
    cells = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") == 7]
    said = {"m\nn": "m\\nn", "\x1b[31mr": "\\033[31mr"}
    assert sorted(cells) == sorted(said.get(name, name).strip() for name in ODD_NAMES), cells
    assert "(1) 1 shard(s) failed (\\033[31mr): MalformedShardError: " in out
    print_summary(odd_manifest(tmp_path, ["m\n<n>", "x"])[0])
    out = capsys.readouterr().out
    assert "warning: shard m\\n<n>: m\\n<n>.tar: a warning of its own\n" in out, out
    assert "without embedding: 2 row(s) in 1 shard(s): not an image in m\\n<n> (e.g. shard m\\n<n>, key m\\n<n>)\n" in out


def test_the_summary_artifacts_on_the_prefect_server_keep_every_name(tmp_path, prefect_api):
    """The run's `shards` table artifact and `summary` markdown artifact, written by the report task in a flow run
    and read back from a real Prefect API server: the table holds each shard's name as it is (JSON), and the
    summary's table keeps its columns and names."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.report import write_report

    manifest, _ = odd_manifest(tmp_path)
    results = [shard(name) for name in ODD_NAMES[:-1]]
    failures = {ODD_NAMES[-1]: "MalformedShardError: not a tar file"}
    config = EmbedConfig.model_validate(manifest["config"])
    (tmp_path / "o|u`t").mkdir()

    @flow
    def reported():
        write_report(config, results, failures, 1.0)

    state = reported(return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in found}
    data = by_key["shards"].data
    table = json.loads(data) if isinstance(data, str) else data
    assert [row["shard"] for row in table] == sorted(ODD_NAMES)
    said = {"m\nn": "m\\nn", "\x1b[31mr": "\\033[31mr"}
    cells, _ = rendered(by_key["summary"].data)
    assert all(len(row) == len(report.TABLE_COLUMNS) for row in cells), cells
    assert sorted(row[0] for row in cells[1:]) == sorted(said.get(name, name) for name in ODD_NAMES)
