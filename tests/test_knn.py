"""A run's output goes straight into kNN tools: embedding-reader (parquet mode) and autofaiss read
OUTPUT/_embeddings with no user code in between, while OUTPUT/<stem>.parquet keeps every row with its reason.

The run: the Python API with the tiny timm test model on the CPU-only DALI pipeline, over img2dataset-style shards
with failed downloads, an undecodable image, a shard in a subfolder (recursive) and a shard where nothing could be
embedded. autofaiss pins numpy<2, which the project's pyarrow cannot import with, so it is not installed here: the
autofaiss test runs where WDSEMBED_AUTOFAISS names its command in a venv of its own (docs/knn.md says how), and is
skipped otherwise.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("nvidia.dali")

from conftest import TINY_MODEL  # noqa: E402
from wdsembed.api import TimmImageEmbedder  # noqa: E402
from wdsembed.synthetic import ShardSample, corrupt_image_bytes, encode_image, make_image, write_shard  # noqa: E402
from wdsembed.validate import validate_output  # noqa: E402

EMB = "image_embedding"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _image(i: int) -> ShardSample:
    return ShardSample(encode_image(make_image(40, 30, seed=i), "bmp"), ext="bmp", caption=f"image {i}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    first = [_image(i) for i in range(6)]
    first[2] = ShardSample(corrupt_image_bytes("truncated", seed=1), ext="jpg", caption="cut short")
    write_shard(root / "in", "00000", first, failed_rows=2)
    write_shard(root / "in" / "more", "00001", [_image(10 + i) for i in range(5)], failed_rows=1, shard_id=1)
    with tarfile.open(root / "in" / "more" / "00002.tar", "w"):  # every download failed: an empty tar
        pass
    pq.write_table(pa.table({"key": ["000020000", "000020001"], "status": ["failed_to_download"] * 2,
                             "error_message": ["HTTP Error 404"] * 2}), root / "in" / "more" / "00002.parquet")
    out = root / "out"
    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                recursive=True)(str(root / "in"), str(out))
    assert sorted((r.stem, r.rows, r.embedded) for r in results) == [
        ("00000", 8, 5), ("more/00001", 6, 5), ("more/00002", 2, 0)]
    return out


def embedded_rows(out: Path) -> dict[tuple[str, str], np.ndarray]:
    """(key, shard) -> embedding, from the full tables: what the kNN tools must see, no more, no less."""
    want = {}
    for stem in json.loads((out / "_manifest.json").read_text())["shards"]:
        for row in pq.read_table(out / f"{stem}.parquet").to_pylist():
            if row[EMB] is not None:
                want[(row["key"], stem)] = np.asarray(row[EMB], np.float32)
            else:
                assert row["embedding_error"]  # every other row is kept, with its reason
    return want


def test_full_tables_keep_every_row_and_the_view_only_embedded_ones(run):
    assert sorted(str(p.relative_to(run)) for p in (run / "_embeddings").rglob("*.parquet")) == [
        "_embeddings/00000.parquet", "_embeddings/more/00001.parquet", "_embeddings/more/00002.parquet"]
    assert pq.read_table(run / "_embeddings" / "more" / "00002.parquet").num_rows == 0
    assert len(embedded_rows(run)) == 10


def test_float32_embeddings_are_stored_uncompressed_in_the_view_and_the_full_table(run):
    """Normalized (float32) embeddings are written as they are, in the view and the full table alike (cheaper to
    write in a GPU worker, and to read); every other column keeps snappy."""
    def codecs(path):
        meta = pq.ParquetFile(path).metadata
        return {meta.schema.column(i).path.split(".")[0]: meta.row_group(0).column(i).compression
                for i in range(meta.num_columns)}

    view, full = codecs(run / "_embeddings" / "00000.parquet"), codecs(run / "00000.parquet")
    assert view[EMB] == full[EMB] == "UNCOMPRESSED" and view["key"] == "SNAPPY"
    assert {name for name, codec in full.items() if codec != "SNAPPY"} == {EMB}


def test_embedding_matrix_is_each_rows_embedding_in_the_tables_order_without_a_copy_of_one_chunk(run):
    """The README showed `np.stack(df.image_embedding.to_numpy())` alone: an array object per row, then a copy of
    them all. embedding_matrix gives the same (rows, dim) matrix from pyarrow, one chunk's values as they are, and
    refuses a null rather than skip it (the matrix's rows would then stop being the table's)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from wdsembed import embedding_matrix

    view = ds.dataset(str(run / "_embeddings"), format="parquet").to_table()
    matrix = embedding_matrix(view)
    want = embedded_rows(run)
    assert matrix.shape == (len(want), int(view.schema.field(EMB).metadata[b"dim"]))
    assert matrix.dtype == np.float32
    for i, (key, stem) in enumerate(zip(view["key"].to_pylist(), view["shard"].to_pylist())):
        assert np.array_equal(matrix[i], want[(key, stem)]), (key, stem)

    one = pq.read_table(run / "_embeddings" / "00000.parquet")
    assert one.column(EMB).num_chunks == 1
    shared = embedding_matrix(one.column(EMB))
    assert np.shares_memory(shared, pc.list_flatten(one.column(EMB).chunk(0)).to_numpy())
    assert not shared.flags.writeable

    full = pq.read_table(run / "00000.parquet")
    with pytest.raises(ValueError, match=r"3 of 8 row\(s\) have no embedding"):
        embedding_matrix(full)
    kept = full.filter(pc.is_valid(full[EMB]))
    assert np.array_equal(embedding_matrix(kept), np.stack(kept.to_pandas()[EMB].to_numpy()))
    empty = pq.read_table(run / "_embeddings" / "more" / "00002.parquet")  # nothing embedded: its width still said
    assert embedding_matrix(empty).shape == (0, matrix.shape[1])


def test_embedding_matrix_reads_sliced_chunks_and_every_list_type_and_refuses_ragged_rows():
    """A dataset's chunks are slices of their files' arrays (a filter, a row group's part): each chunk's own rows,
    in order, whatever list type holds them; rows of two lengths are no one model's embeddings."""
    from wdsembed import embedding_matrix

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)
    for column in (fixed, fixed.cast(pa.list_(pa.float32())), fixed.cast(pa.large_list(pa.float32()))):
        assert np.array_equal(embedding_matrix(column.slice(2, 3)), x[2:5])
        assert np.array_equal(embedding_matrix(pa.chunked_array([column.slice(0, 2), column.slice(4, 2)])),
                              x[[0, 1, 4, 5]])
    with pytest.raises(ValueError, match=r"differ in length \(1 to 2\)"):
        embedding_matrix(pa.array([[1.0, 2.0], [3.0]]))


def test_the_readmes_reading_snippets_run_as_written_and_lead_back_to_each_rows_tar(run):
    """The README's two reading snippets, run as written on a run's output: the matrix of every embedded row, and
    near-duplicate pairs from the kNN view, each named by shard and key, which the manifest's `tar` of that shard
    leads back to the image (the manifest named only each shard's output, so a shard read from a pattern or a list
    of URLs could not be found from its stem)."""
    import pyarrow.dataset as ds

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    want = embedded_rows(run)
    scope: dict = {}
    exec(next(b for b in blocks if "embedding_matrix(table)" in b).replace("demo-output", str(run)), scope)
    assert scope["X"].shape[0] == len(want) == scope["table"].num_rows
    scope = {}
    exec(next(b for b in blocks if "fill_diagonal" in b).replace("demo-output", str(run)), scope)
    manifest = json.loads((run / "_manifest.json").read_text())
    root = run.parent / "in"
    assert {stem: entry["tar"] for stem, entry in manifest["shards"].items()} == {
        "00000": str(root / "00000.tar"), "more/00001": str(root / "more" / "00001.tar"),
        "more/00002": str(root / "more" / "00002.tar")}
    close = {(a, b) for a in want for b in want if a < b and float(want[a] @ want[b]) > 0.95}
    assert close  # random weights: images alike enough to pair
    assert {tuple(sorted([(k1, s1), (k2, s2)])) for s1, k1, s2, k2 in scope["pairs"]} == close
    for s1, k1, s2, k2 in scope["pairs"]:
        for stem, key in ((s1, k1), (s2, k2)):
            with tarfile.open(manifest["shards"][stem]["tar"]) as tar:
                assert f"{key}.bmp" in tar.getnames()
            assert key in ds.dataset(str(run / f"{stem}.parquet")).to_table(columns=["key"])["key"].to_pylist()


def test_embedding_reader_reads_a_runs_output(run):
    er = pytest.importorskip("embedding_reader")
    want = embedded_rows(run)
    # the full tables are what fails: nulls where rows have no embedding
    with pytest.raises(ValueError):
        list(er.EmbeddingReader(str(run), file_format="parquet", embedding_column=EMB)(batch_size=64,
                                                                                     show_progress=False))
    reader = er.EmbeddingReader(str(run / "_embeddings"), file_format="parquet", embedding_column=EMB,
                                meta_columns=["key", "shard"])
    assert reader.count == len(want) and reader.dimension == len(next(iter(want.values())))
    seen = {}
    for vectors, meta in reader(batch_size=3, show_progress=False):
        for vector, key, stem in zip(vectors, meta["key"], meta["shard"]):
            seen[(key, stem)] = vector
    assert sorted(seen) == sorted(want)
    assert all(np.array_equal(seen[k], want[k]) for k in want)


def test_embedding_reader_reads_an_output_whose_path_holds_a_bracket_through_the_docs_escape(run, tmp_path):
    """embedding-reader globs its folder: OUTPUT `photos [2024]` read as the pattern `photos [2024]` finds no file
    (docs/knn.md says to pass it glob.escape'd, which reads every row)."""
    er = pytest.importorskip("embedding_reader")
    out = tmp_path / "photos [2024]"
    shutil.copytree(run, out)
    with pytest.raises(ValueError, match="No embeddings found"):
        er.EmbeddingReader(str(out / "_embeddings"), file_format="parquet", embedding_column=EMB)
    reader = er.EmbeddingReader(glob.escape(str(out / "_embeddings")), file_format="parquet", embedding_column=EMB,
                                meta_columns=["key", "shard"])
    assert reader.count == len(embedded_rows(run))
    assert sum(len(vectors) for vectors, _ in reader(batch_size=64, show_progress=False)) == reader.count


def test_autofaiss_builds_an_index_from_a_runs_output(run, tmp_path):
    command = os.environ.get("WDSEMBED_AUTOFAISS")
    if not command:
        pytest.skip("autofaiss not installed (it pins numpy<2): set WDSEMBED_AUTOFAISS to its command in its own "
                    "venv, see docs/knn.md")
    python = str(Path(command).with_name("python"))
    index, infos, ids = tmp_path / "knn.index", tmp_path / "infos.json", tmp_path / "ids"
    done = subprocess.run([command, "build_index", f"--embeddings={run / '_embeddings'}", f"--index_path={index}",
                           f"--index_infos_path={infos}", "--file_format=parquet", f"--embedding_column_name={EMB}",
                           '--id_columns=["key","shard"]', f"--ids_path={ids}", "--metric_type=ip"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(infos.read_text())["nb vectors"] == 10
    # every vector of the index is the embedding of the row its id names
    want = {f"{k}|{s}": v.tolist() for (k, s), v in embedded_rows(run).items()}
    check = ("import faiss, glob, json, sys, pyarrow.parquet as pq\n"
             "index = faiss.read_index(sys.argv[1])\n"
             "ids = pq.read_table(glob.glob(sys.argv[2] + '/*.parquet')).to_pylist()\n"
             "print(json.dumps({f\"{r['key']}|{r['shard']}\": index.reconstruct(r['i']).tolist() for r in ids}))\n")
    got = subprocess.run([python, "-c", check, str(index), str(ids)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout) == want


def test_the_docs_search_recipe_names_the_neighbours_of_an_index_smaller_than_k(run, tmp_path):
    """docs/knn.md's search snippet, run as written on an index of one subfolder's views (5 vectors, fewer than its
    k of 10): faiss gives position -1 where it finds fewer than k (so does an IVF index whose probes hold fewer),
    and the snippet's `ids.loc[positions[0]]` failed with KeyError: '[-1] not in index'. It names the neighbours
    found, the query's own row first."""
    command = os.environ.get("WDSEMBED_AUTOFAISS")
    if not command:
        pytest.skip("autofaiss not installed (it pins numpy<2): set WDSEMBED_AUTOFAISS to its command in its own "
                    "venv, see docs/knn.md")
    done = subprocess.run([command, "build_index", f"--embeddings={run / '_embeddings' / 'more'}",
                           "--index_path=knn.index", "--index_infos_path=knn_infos.json", "--file_format=parquet",
                           f"--embedding_column_name={EMB}", '--id_columns=["key","shard"]', "--ids_path=knn_ids",
                           "--metric_type=ip"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", (DOCS / "knn.md").read_text(), re.S)
                   if "faiss.read_index" in block)
    query = pq.read_table(run / "_embeddings" / "more" / "00001.parquet").slice(0, 1)
    script = (f"import numpy as np\nqueries = np.array({query.column(EMB).to_pylist()}, dtype='float32')\n"
              f"{snippet}\nprint(json.dumps(neighbours.values.tolist()))\n")
    got = subprocess.run([str(Path(command).with_name("python")), "-c", "import json\n" + script],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    neighbours = json.loads(got.stdout)
    assert len(neighbours) == 5 and neighbours[0] == [query.column("key")[0].as_py(), "more/00001"]


def test_the_docs_lookup_gives_each_neighbours_row_and_tar_in_the_neighbours_order(run):
    """docs/knn.md's snippet from neighbours (key, shard: what the index's ids name) to their full rows, run as
    written on the ids of three embedded rows of two shards: each gets its own row's caption and url, and the tar
    that holds its image. The docs said only that key and shard name the row; the manifest did not name the tar."""
    import pandas as pd

    snippet = re.findall(r"```python\n(.*?)```", (DOCS / "knn.md").read_text(), re.S)
    snippet = next(b for b in snippet if "manifest" in b and "neighbours.merge" in b)
    want = embedded_rows(run)
    first = sorted(k for k in want if k[1] == "00000")
    picked = [first[-1], min(k for k in want if k[1] == "more/00001"), first[0]]  # out of order, two shards
    scope = {"neighbours": pd.DataFrame(picked, columns=["key", "shard"])}
    exec(snippet.replace("OUTPUT", str(run)), scope)
    described = scope["described"]
    assert list(zip(described.key, described.shard)) == picked
    for key, stem, caption, url, tar in zip(described.key, described.shard, described.caption, described.url,
                                             described.tar):
        row = next(r for r in pq.read_table(run / f"{stem}.parquet").to_pylist() if r["key"] == key)
        assert (caption, url) == (row["caption"], row["url"]) and caption.startswith("image ")
        with tarfile.open(tar) as held:
            assert f"{key}.bmp" in held.getnames()


def test_a_key_the_parquet_repeats_is_in_the_view_on_each_row_as_the_docs_say(tmp_path):
    """docs/knn.md: a key that the shard's parquet repeats is in the view once per row, one embedding for both, so
    (key, shard) is no unique id there (a near-duplicate pass pairs the image with itself); its count finds them."""
    written = write_shard(tmp_path / "in", "00000", [_image(i) for i in range(3)])
    parquet = pq.read_table(written.parquet)
    pq.write_table(pa.concat_tables([parquet, parquet.slice(1, 1)]), written.parquet)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                      fidelity_sample=0)(str(tmp_path / "in"), str(out))
    view = pq.read_table(out / "_embeddings" / "00000.parquet")
    repeated = written.keys[1]
    assert view["key"].to_pylist() == [*written.keys, repeated]
    rows = [i for i, key in enumerate(view["key"].to_pylist()) if key == repeated]
    assert view[EMB][rows[0]] == view[EMB][rows[1]]
    docs = (DOCS / "knn.md").read_text()
    counting = re.search(r'`(pq\.read_table\("OUTPUT/_embeddings"\)[^`]*)`', docs).group(1)
    counts = eval(counting.replace("OUTPUT", str(out)), {"pq": pq})
    assert {(r["key"], r["key_count"]) for r in counts.to_pylist() if r["key_count"] > 1} == {(repeated, 2)}


def test_without_the_view_each_embedding_is_stored_once_and_a_later_run_adds_the_views(tmp_path):
    """knn_view=False: no OUTPUT/_embeddings at all, the full tables as with it. A later run with views on computes
    nothing and writes each shard's view from its full table; a shard embedded again without views loses its old
    view, which held the embeddings its new table replaces."""
    er = pytest.importorskip("embedding_reader")
    write_shard(tmp_path / "in", "00000", [_image(i) for i in range(5)], failed_rows=1)
    write_shard(tmp_path / "in", "00001", [_image(10 + i) for i in range(4)], shard_id=1)
    out = tmp_path / "out"

    def embedder(**kw):
        return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4,
                                 num_threads_per_worker=1, **kw)

    bare = embedder(knn_view=False)(str(tmp_path / "in"), str(out))
    assert sorted((r.stem, r.rows, r.embedded, r.cached) for r in bare) == [
        ("00000", 6, 5, False), ("00001", 4, 4, False)]
    assert not (out / "_embeddings").exists()
    want = embedded_rows(out)
    assert len(want) == 9
    first = bare[0]
    config = embedder(knn_view=False).config(str(tmp_path / "in"), str(out))
    assert validate_output(config, first.output, dim=first.dim, expected_rows=6, expected_embedded=5).ok
    missing = validate_output(config.model_copy(update={"knn_view": True}), first.output, dim=first.dim)
    assert missing.problems == ["kNN view _embeddings/00000.parquet is missing"]

    viewed = embedder()(str(tmp_path / "in"), str(out))
    assert [r.cached for r in viewed] == [True, True]
    reader = er.EmbeddingReader(str(out / "_embeddings"), file_format="parquet", embedding_column=EMB,
                                meta_columns=["key", "shard"])
    seen = {(key, stem): vector for vectors, meta in reader(batch_size=4, show_progress=False)
            for vector, key, stem in zip(vectors, meta["key"], meta["shard"])}
    assert seen.keys() == want.keys()
    assert all(np.array_equal(seen[k], want[k]) for k in want)

    again = embedder(knn_view=False, force=True)(str(tmp_path / "in"), str(out))
    assert [r.cached for r in again] == [False, False]
    assert sorted(p.name for p in (out / "_embeddings").iterdir()) == []
    assert embedded_rows(out).keys() == want.keys()


def test_validate_output_notices_a_view_whose_rows_are_not_the_shards(run, tmp_path):
    """docs/knn.md: validate_output checks that the view holds exactly the shard's embedded rows. A run's views
    pass (the empty one too); a view with the right row count and footer but other keys and zero vectors, one
    embedding value changed, or its rows in another order, fails, naming the view and the row."""
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 recursive=True)
    config = embedder.config(str(run.parent / "in"), str(run))
    dim = len(next(iter(embedded_rows(run).values())))
    for stem in ("00000", "more/00001", "more/00002"):
        assert validate_output(config, str(run / f"{stem}.parquet"), dim=dim).problems == [], stem

    write_shard(tmp_path / "in", "00000", [_image(i) for i in range(5)], failed_rows=1)
    out = tmp_path / "out"
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)
    [result] = embedder(str(tmp_path / "in"), str(out))
    config = embedder.config(str(tmp_path / "in"), str(out))
    url = str(out / "00000.parquet")
    assert validate_output(config, url, dim=result.dim).ok
    view_path = out / "_embeddings" / "00000.parquet"
    view = pq.read_table(view_path)
    assert view.num_rows == 5
    vectors = view.column(EMB).combine_chunks()
    values = np.asarray(vectors.values).copy()
    values[3 * result.dim + 2] += np.float32(1e-3)  # row 3, value 2
    zeros = [np.zeros(result.dim, np.float32).tolist()] * view.num_rows
    tampered = {
        "other keys, zero vectors": view.set_column(0, "key", pa.array(["not-a-key-of-this-shard"] * view.num_rows))
                                        .set_column(1, view.schema.field(EMB), pa.array(zeros, vectors.type)),
        "one value": view.set_column(1, view.schema.field(EMB),
                                     pa.ListArray.from_arrays(vectors.offsets, pa.array(values, pa.float32()))),
        "reordered": view.take(pa.array([0, 1, 3, 2, 4])),
    }
    keys = view.column("key").to_pylist()
    expected = {
        "other keys, zero vectors": f"kNN view _embeddings/00000.parquet row 0 has key 'not-a-key-of-this-shard', "
                                    f"the output's embedded row 0 {keys[0]!r}",
        "one value": f"kNN view _embeddings/00000.parquet row 3 (key {keys[3]!r}) has another embedding than the "
                     "output's: value 2 is ",
        "reordered": f"kNN view _embeddings/00000.parquet row 2 has key {keys[3]!r}, the output's embedded row 2 "
                     f"{keys[2]!r}",
    }
    for how, table in tampered.items():
        pq.write_table(table.replace_schema_metadata(view.schema.metadata), view_path)  # same rows count, same footer
        check = validate_output(config, url, dim=result.dim)
        assert not check.ok, f"a view with {how} passes validate_output"
        assert len(check.problems) == 1 and check.problems[0].startswith(expected[how]), (how, check.problems)
    pq.write_table(view, view_path)
    assert validate_output(config, url, dim=result.dim).ok


def test_float16_embeddings_take_half_the_space_keep_their_direction_and_read_as_the_float32_ones(tmp_path):
    """embedding_dtype="float16" against the same run in float32: the same rows, each embedding within 0.9999 cosine,
    the view about half the size and read by embedding-reader; the dtype is part of the cache key, so an output
    made in float32 is embedded again, not taken as it is."""
    er = pytest.importorskip("embedding_reader")
    write_shard(tmp_path / "in", "00000", [_image(i) for i in range(6)], failed_rows=1)
    write_shard(tmp_path / "in", "00001", [_image(20 + i) for i in range(5)], shard_id=1)

    def run(out: str, **kw):
        return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4,
                                 num_threads_per_worker=1, **kw)(str(tmp_path / "in"), str(tmp_path / out))

    full, half = run("f32"), run("f16", embedding_dtype="float16")
    assert [(r.stem, r.embedded, r.cached) for r in half] == [(r.stem, r.embedded, False) for r in full]
    assert all(r.fidelity["cosines"] and min(r.fidelity["cosines"].values()) >= 0.9999 for r in half)
    want32, want16 = embedded_rows(tmp_path / "f32"), embedded_rows(tmp_path / "f16")
    assert want16.keys() == want32.keys() and len(want16) == 11
    for k, v in want16.items():
        w = want32[k]
        assert float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)) >= 0.9999, k
    table = pq.read_table(tmp_path / "f16" / "00000.parquet")
    assert table.schema.field(EMB).type == pa.list_(pa.float16())
    view16, view32 = (tmp_path / d / "_embeddings" / "00000.parquet" for d in ("f16", "f32"))
    assert view16.stat().st_size < 0.7 * view32.stat().st_size
    reader = er.EmbeddingReader(str(tmp_path / "f16" / "_embeddings"), file_format="parquet",
                                embedding_column=EMB, meta_columns=["key", "shard"])
    seen = {(key, stem): vector for vectors, meta in reader(batch_size=4, show_progress=False)
            for vector, key, stem in zip(vectors, meta["key"], meta["shard"])}
    assert seen.keys() == want16.keys() and all(np.array_equal(seen[k], want16[k]) for k in want16)
    import pyarrow.dataset as ds

    from wdsembed import embedding_matrix

    view = ds.dataset(str(tmp_path / "f16" / "_embeddings"), format="parquet").to_table()
    matrix = embedding_matrix(view)
    assert matrix.dtype == np.float16 and matrix.shape[0] == 11
    assert all(np.array_equal(row, want16[k]) for row, k in zip(matrix, zip(view["key"].to_pylist(),
                                                                             view["shard"].to_pylist())))
    wide = embedding_matrix(view, dtype=np.float32)  # what arithmetic wants: NumPy's float16 matmul has no BLAS
    assert wide.dtype == np.float32 and np.array_equal(wide, matrix.astype(np.float32))
    one = pq.read_table(tmp_path / "f32" / "_embeddings" / "00001.parquet")  # float32 (until `again` below)
    assert np.shares_memory(embedding_matrix(one, dtype=np.float32), embedding_matrix(one))

    again = run("f32", embedding_dtype="float16")
    assert [r.cached for r in again] == [False, False]
    assert pq.read_schema(tmp_path / "f32" / "00001.parquet").field(EMB).type == pa.list_(pa.float16())


def test_the_readmes_merged_schema_reads_every_column_when_the_first_shard_had_no_parquet(tmp_path):
    """pyarrow and pandas take a dataset's columns from its first file: where the first shard had no img2dataset
    parquet, its output lacks caption/url/status, and reading OUTPUT dropped them from every shard. The README's
    snippet (run as written, on this output) reads every column of every shard."""
    import re

    for s in range(2):
        write_shard(tmp_path / "in", f"{s:05d}", [_image(10 * s + i) for i in range(3)], parquet=s != 0,
                    stats=s != 0, shard_id=s)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                      fidelity_sample=0)(str(tmp_path / "in"), str(out))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "unify_schemas" in b)
    scope: dict = {}
    exec("import pyarrow as pa, pyarrow.dataset as ds\n" + snippet.replace('"demo-output"', repr(str(out))), scope)
    table = scope["table"]
    assert table.num_rows == 6 and {"key", "caption", "url", "status", "image_embedding"} <= set(table.column_names)
    assert sum(c is not None for c in table.column("caption").to_pylist()) == 3  # the second shard's captions


def _readme_merged_read(out: Path) -> pa.Table:
    """OUTPUT read as the README's snippet reads it (every file's schema merged), run as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "unify_schemas" in b)
    scope: dict = {}
    exec("import pyarrow as pa, pyarrow.dataset as ds\n" + snippet.replace('"demo-output"', repr(str(out))), scope)
    return scope["table"]


def test_a_shard_without_a_parquet_takes_the_integer_ids_of_the_others(tmp_path):
    """Integer ids (the parquets' key column converted to int64) and one shard without a parquet: that shard's
    output and kNN view had string keys (from its member names), so the README's merged read failed ('Field key has
    incompatible types: int64 vs string') and pandas turned the strings into integers without a word. Its keys now
    take the run's id type, from the other shards' parquets or, where the run names none, from the outputs already
    in OUTPUT; a member name that is no integer is a failed row naming it, every other image embedded. With no
    parquet anywhere, keys stay strings."""
    import pandas as pd

    def embed(input: Path, out: Path):
        return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0)(str(input), str(out))

    data = tmp_path / "in"
    w = write_shard(data, "00000", [_image(i) for i in range(4)], failed_rows=1)
    t = pq.read_table(w.parquet)
    pq.write_table(t.set_column(0, "key", t.column("key").cast(pa.int64())), w.parquet)
    write_shard(data, "00001", [_image(10 + i) for i in range(3)]
                + [ShardSample(_image(13).image, ext="bmp", key="abc")], shard_id=1, parquet=False, stats=False)

    def check(out: Path) -> None:
        for f in sorted(out.rglob("*.parquet")):
            assert pq.read_schema(f).field("key").type == pa.int64(), f
        table = _readme_merged_read(out)
        assert table.num_rows == 9 and table.schema.field("key").type == pa.int64()
        got = {(k, e is not None, why) for k, e, why in zip(*(table.column(c).to_pylist()
                                                           for c in ("key", EMB, "embedding_error")))}
        assert {(k, True, None) for k in (0, 1, 2, 4, 10000, 10001, 10002)} <= got
        assert (None, False, "key 'abc' is not an integer, as the run's ids (int64) are") in got
        view = pd.read_parquet(out / "_embeddings")
        assert sorted(view.key) == [0, 1, 2, 4, 10000, 10001, 10002]

    [a, b] = embed(data, tmp_path / "out")
    check(tmp_path / "out")
    assert (b.embedded, b.failed) == (3, 1)
    assert [r.cached for r in embed(data, tmp_path / "out")] == [True, True]
    # The shard without a parquet alone, into an OUTPUT whose outputs hold integer ids: it takes theirs.
    embed(data / "00000.tar", tmp_path / "alone")
    embed(data / "00001.tar", tmp_path / "alone")
    check(tmp_path / "alone")
    # Alone in an OUTPUT that tells no type, its keys stay strings; named with the others later, it is remade.
    embed(data / "00001.tar", tmp_path / "old")
    assert pq.read_schema(tmp_path / "old" / "00001.parquet").field("key").type == pa.string()
    assert [r.cached for r in embed(data, tmp_path / "old")] == [False, False]
    check(tmp_path / "old")

    # No parquet anywhere: the member names, as strings.
    bare = tmp_path / "bare"
    for s in range(2):
        write_shard(bare, f"{s:05d}", [_image(10 * s + i) for i in range(2)], shard_id=s, parquet=False, stats=False)
    embed(bare, tmp_path / "bare-out")
    table = _readme_merged_read(tmp_path / "bare-out")
    assert table.schema.field("key").type == pa.string()
    assert sorted(table.column("key").to_pylist()) == ["000000000", "000000001", "000010000", "000010001"]


def _int64_ids(parquet) -> None:
    t = pq.read_table(parquet)
    pq.write_table(t.set_column(0, "key", t.column("key").cast(pa.int64())), parquet)


def test_a_shard_whose_parquet_is_damaged_takes_the_integer_ids_of_the_others(tmp_path):
    """Integer ids, and one shard whose img2dataset parquet cannot be read (cut short): that shard's tar samples
    were still embedded, as they should be, but keyed as strings beside the others' int64 ids, so the README's
    merged read of OUTPUT failed ('Field key has incompatible types'). Its keys now take the run's id type, as a
    shard without a parquet's do; the warning still names the damaged parquet."""
    data = tmp_path / "in"
    _int64_ids(write_shard(data, "00000", [_image(i) for i in range(3)], failed_rows=1).parquet)
    damaged = write_shard(data, "00001", [_image(10 + i) for i in range(3)], shard_id=1).parquet
    _int64_ids(damaged)
    Path(damaged).write_bytes(Path(damaged).read_bytes()[:-20])
    [a, b] = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                               fidelity_sample=0)(str(data), str(tmp_path / "out"))
    assert b.embedded == 3 and any("cannot read as parquet" in w for w in b.warnings), b.warnings
    for f in sorted((tmp_path / "out").rglob("*.parquet")):
        assert pq.read_schema(f).field("key").type == pa.int64(), f
    table = _readme_merged_read(tmp_path / "out")
    assert sorted(k for k, e in zip(table.column("key").to_pylist(), table.column(EMB).to_pylist())
                  if e is not None) == [0, 1, 2, 10000, 10001, 10002]


def test_parquets_whose_id_columns_differ_in_type_are_refused_before_the_run(tmp_path):
    """One shard's parquet with int64 ids, another's with string ids (a partial conversion): each output took its
    parquet's type, and OUTPUT then held two id types that no merged read, concat or kNN view takes. Refused before
    any work, naming the types and the shards of each."""
    data = tmp_path / "in"
    _int64_ids(write_shard(data, "00000", [_image(i) for i in range(2)]).parquet)
    write_shard(data, "00001", [_image(10 + i) for i in range(2)], shard_id=1)
    _int64_ids(write_shard(data, "00002", [_image(20 + i) for i in range(2)], shard_id=2).parquet)
    embed = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              fidelity_sample=0)
    with pytest.raises(ValueError, match=r"id column 'key'.*int64 in 00000\.parquet, 00002\.parquet; string in "
                                         r"00001\.parquet"):
        embed(str(data), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "00000.parquet").exists()


def test_a_shard_whose_parquet_ids_differ_from_the_runs_fails_alone(tmp_path):
    """Where the pre-flight does not read every parquet (the shards' own planning, as on an object store), a shard
    whose parquet's id type is not the run's fails before it is embedded, naming both types; the others are
    written."""
    from wdsembed import plan, shard
    from wdsembed.config import EmbedConfig

    data = tmp_path / "in"
    _int64_ids(write_shard(data, "00000", [_image(i) for i in range(2)]).parquet)
    write_shard(data, "00001", [_image(10 + i) for i in range(2)], shard_id=1)
    config = EmbedConfig(input=str(data), output=str(tmp_path / "out"), model_name=TINY_MODEL, pretrained=False,
                         device="cpu", batch_size=4, num_threads_per_worker=1, fidelity_sample=0)
    with pytest.raises(shard.ShardsFailed) as err:
        shard.process_shards(config, plan.plan_shards(config))
    assert list(err.value.failures) == ["00001"]
    assert re.search(r"id column 'key' is string.*the run's ids are int64", err.value.failures["00001"]), \
        err.value.failures
    assert (tmp_path / "out" / "00000.parquet").exists() and not (tmp_path / "out" / "00001.parquet").exists()


def test_a_dictionary_encoded_id_column_merges_with_the_runs_other_keys(tmp_path):
    """A parquet with a dictionary-encoded key column (strings) beside a shard without a parquet: the first output
    and its view kept the dictionary type, the other plain strings, and the README's merged read of OUTPUT failed
    ('Field key has incompatible types: dictionary<values=string, ...> vs string'). Both now hold strings, and each
    embedding is on its own key's row."""
    data = tmp_path / "in"
    w = write_shard(data, "00000", [_image(i) for i in range(3)], failed_rows=1)
    t = pq.read_table(w.parquet)
    pq.write_table(t.set_column(0, "key", t.column("key").dictionary_encode()), w.parquet)
    assert pa.types.is_dictionary(pq.read_schema(w.parquet).field("key").type)
    write_shard(data, "00001", [_image(10 + i) for i in range(2)], shard_id=1, parquet=False, stats=False)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                      fidelity_sample=0)(str(data), str(out))
    for f in sorted(out.rglob("*.parquet")):
        assert pq.read_schema(f).field("key").type == pa.string(), f
    table = _readme_merged_read(out)
    assert sorted(k for k, e in zip(table.column("key").to_pylist(), table.column(EMB).to_pylist())
                  if e is not None) == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    # each key's embedding is its own image's: the view's rows against the full tables'
    view = {(r["key"], r["shard"]): r[EMB] for r in pq.read_table(out / "_embeddings").to_pylist()}
    assert view == {k: v.tolist() for k, v in embedded_rows(out).items()}


def test_a_run_naming_some_shards_says_which_others_have_no_kNN_view(tmp_path, caplog):
    """Versions before kNN views (2026-11-29's, checked with its own command) wrote the full tables alone. After an
    upgrade, a run naming only the new shards ('data/{00000..00000}.tar') wrote their views and left the others'
    tables without one, with no word: kNN tools reading OUTPUT/_embeddings saw half the dataset, while the summary
    counted every row embedded. It now says which finished shards it does not name have no view, and what writes
    them; a run with knn_view off, or whose other shards all have their views, says nothing of it."""
    data = tmp_path / "in"
    write_shard(data, "00000", [_image(i) for i in range(2)])
    write_shard(data, "00001", [_image(10 + i) for i in range(2)], shard_id=1)
    out = tmp_path / "out"
    settings = dict(pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1, fidelity_sample=0)
    embed = TimmImageEmbedder(TINY_MODEL, **settings)
    without_views = TimmImageEmbedder(TINY_MODEL, knn_view=False, **settings)
    without_views(str(data), str(out))  # the tables as a version before views wrote them: no view

    def lines(embedder=embed) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            embedder(f"{data}/{{00000..00000}}.tar", str(out))
        return [r.getMessage() for r in caplog.records if "kNN view" in r.getMessage()]

    said = lines()
    assert len(said) == 1 and said[0].startswith("1 finished shard(s) in OUTPUT that this run does not name have no "
                                                 "kNN view (_embeddings/)") and said[0].endswith(": 00001"), said
    assert (out / "_embeddings" / "00000.parquet").exists() and not (out / "_embeddings" / "00001.parquet").exists()
    assert lines(without_views) == []
    embed(str(data), str(out))  # a run that names it writes its view
    assert (out / "_embeddings" / "00001.parquet").exists()
    assert lines() == []


def test_outputs_an_earlier_version_wrote_with_dictionary_ids_are_rewritten_with_plain_ids(tmp_path):
    """Before 2026-12-06 a parquet with a dictionary-encoded key column gave an output and a kNN view of that type
    (checked with that version's own command: dictionary<values=string, indices=int32>). The cache key did not
    change with the fix, so after an upgrade such shards stayed finished as they were, beside the new version's
    string keys: the README's merged read of OUTPUT failed ('Field key has incompatible types'), silently until
    then. The run that finds them now rewrites their table and view with the ids' values, embedding nothing."""
    from wdsembed import output, storage

    data = tmp_path / "in"
    w = write_shard(data, "00000", [_image(i) for i in range(3)], failed_rows=1)
    t = pq.read_table(w.parquet)
    pq.write_table(t.set_column(0, "key", t.column("key").dictionary_encode()), w.parquet)
    write_shard(data, "00001", [_image(10 + i) for i in range(2)], shard_id=1)
    out = tmp_path / "out"
    embed = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              fidelity_sample=0)
    embed(str(data), str(out))
    before = embedded_rows(out)
    # 00000's table and view as the earlier version wrote them: the same rows and footer, the key dictionary-typed
    fs, _ = storage.filesystem(str(out))
    for f in (out / "00000.parquet", out / "_embeddings" / "00000.parquet"):
        t = pq.read_table(f)
        meta = output.footer_metadata(t.schema.metadata)
        t = t.set_column(0, "key", t.column("key").dictionary_encode()).replace_schema_metadata(None)
        output.write_parquet_atomic(t, str(f), fs, meta)
        assert pa.types.is_dictionary(pq.read_schema(f).field("key").type)

    results = embed(str(data), str(out))
    assert all(r.cached for r in results)  # nothing embedded again
    for f in sorted(out.rglob("*.parquet")):
        assert pq.read_schema(f).field("key").type == pa.string(), f
    table = _readme_merged_read(out)
    assert table.num_rows == 4 + 2
    assert {k: v.tolist() for k, v in embedded_rows(out).items()} == {k: v.tolist() for k, v in before.items()}
    view = {(r["key"], r["shard"]): r[EMB] for r in pq.read_table(out / "_embeddings").to_pylist()}
    assert view == {k: v.tolist() for k, v in before.items()}
    dim = json.loads((out / "_manifest.json").read_text())["model"]["dim"]
    for stem in ("00000", "00001"):
        check = validate_output(embed.config(str(data), str(out)), str(out / f"{stem}.parquet"), dim=dim)
        assert check.ok, check.problems


def test_a_shard_that_fails_under_a_new_model_leaves_no_output_of_the_old_one(tmp_path):
    """A run with another model rewrites every shard it names; one of them failing kept its earlier output and view,
    of the old model: two embedding spaces (here of 96 and 64 dimensions) in OUTPUT and in the kNN view, beside a
    manifest naming the new model. The failed shard's earlier output goes, with its view; an earlier output of the
    run's own settings stays where the shard fails again."""
    from wdsembed.shard import ShardsFailed

    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(2):
        write_shard(data, f"{s:05d}", [_image(10 * s + i) for i in range(3)], shard_id=s)
    own = (data / "00001.parquet").read_bytes()

    def embedder(model):
        return TimmImageEmbedder(model, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0)

    embedder(TINY_MODEL)(str(data), str(out))
    (data / "00001.parquet").write_bytes((data / "00000.parquet").read_bytes())  # another tar's rows: it fails
    with pytest.raises(ShardsFailed, match="00001"):
        embedder("test_vit.r160_in1k")(str(data), str(out))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == [
        "00000.parquet", "_embeddings/00000.parquet"]
    assert {len(v) for v in pq.read_table(out / "_embeddings").column(EMB).to_pylist()} == {64}
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["name"] == "test_vit.r160_in1k" and list(manifest["failed_shards"]) == ["00001"]

    (data / "00001.parquet").write_bytes(own)
    embedder("test_vit.r160_in1k")(str(data), str(out))
    (data / "00001.parquet").write_bytes((data / "00000.parquet").read_bytes())
    with pytest.raises(ShardsFailed, match="00001"):  # the same model: its earlier output is of the same space
        embedder("test_vit.r160_in1k")(str(data), str(out))
    assert (out / "00001.parquet").exists() and (out / "_embeddings" / "00001.parquet").exists()


def test_the_view_keeps_no_rows_of_a_shard_whose_table_is_not_in_output(tmp_path, monkeypatch, caplog):
    """A growing dataset: a new shard failed between its view and its table (a full disk on the table, the claim
    lost), and a shard dropped from INPUT had its table removed by hand. Both kept their views: kNN tools then
    returned rows whose `shard` names no table in OUTPUT, beyond what the manifest counts. The run removes every
    view without its table, saying so; the view then holds exactly the embedded rows of the tables."""
    import logging

    from wdsembed.shard import ShardsFailed

    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(2):
        write_shard(data, f"{s:05d}", [_image(10 * s + i) for i in range(3)], shard_id=s)
    embed = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              fidelity_sample=0)
    embed(str(data), str(out))

    write_shard(data, "00002", [_image(20 + i) for i in range(3)], shard_id=2)  # the next day's shard
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"00002": {"error": "io", "where": "commit"}}))  # its view written, not its table
    monkeypatch.setenv("WDSEMBED_FAULTS", str(spec))
    with caplog.at_level(logging.WARNING, logger="wdsembed"), pytest.raises(ShardsFailed, match="00002"):
        embed(str(data), str(out))
    monkeypatch.delenv("WDSEMBED_FAULTS")
    assert not (out / "00002.parquet").exists()
    assert sorted(p.name for p in (out / "_embeddings").iterdir()) == ["00000.parquet", "00001.parquet"]
    [said] = [r.getMessage() for r in caplog.records if "_embeddings" in r.getMessage()]
    assert "00002" in said and "no table" in said, said

    (data / "00001.tar").unlink()  # dropped from the dataset, and its output with it
    (out / "00001.parquet").unlink()
    embed(str(data), str(out))
    assert sorted(p.name for p in (out / "_embeddings").iterdir()) == ["00000.parquet", "00002.parquet"]
    view = pq.read_table(out / "_embeddings")
    assert view.num_rows == json.loads((out / "_manifest.json").read_text())["totals"]["in_output"]["embedded_rows"]
    assert sorted(set(view.column("shard").to_pylist())) == ["00000", "00002"]


def test_an_id_column_named_shard_keeps_the_id_and_the_stem_in_the_view(tmp_path):
    """--id-column shard (the user's key column is named `shard`): the view's stem column took that name too, so the
    view held the ids and no stem, and kNN tools could not tell which table a row came from. The stem goes in
    `shard_` then (docs/knn.md), every id kept; embedding-reader reads both, validate_output passes, and a view
    written without the stem (an earlier version's) is rebuilt from the table by the next run, embedding nothing."""
    er = pytest.importorskip("embedding_reader")
    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(2):
        write_shard(data / ("sub" if s else ""), f"{s:05d}", [_image(10 * s + i) for i in range(4)], failed_rows=1,
                    shard_id=s)
        parquet = data / ("sub" if s else "") / f"{s:05d}.parquet"
        pq.write_table(pq.read_table(parquet).rename_columns(
            ["shard" if c == "key" else c for c in pq.read_schema(parquet).names]), parquet)
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0, recursive=True, id_column="shard")
    results = embedder(str(data), str(out))
    assert sorted((r.stem, r.embedded) for r in results) == [("00000", 4), ("sub/00001", 4)]
    view = pq.read_table(out / "_embeddings" / "sub" / "00001.parquet")
    assert view.column_names == ["shard", EMB, "shard_"]
    full = pq.read_table(out / "sub" / "00001.parquet")
    assert view.column("shard").to_pylist() == [k for k, e in zip(full.column("shard").to_pylist(),
                                                                 full.column(EMB).to_pylist()) if e is not None]
    assert set(view.column("shard_").to_pylist()) == {"sub/00001"}
    config = embedder.config(str(data), str(out))
    for r in results:
        assert validate_output(config, r.output, dim=r.dim).problems == [], r.stem
    reader = er.EmbeddingReader(str(out / "_embeddings"), file_format="parquet", embedding_column=EMB,
                                meta_columns=["shard", "shard_"])
    seen = {(key, stem) for _, meta in reader(batch_size=4, show_progress=False)
            for key, stem in zip(meta["shard"], meta["shard_"])}
    assert len(seen) == 8 and {stem for _, stem in seen} == {"00000", "sub/00001"}

    # a view as an earlier version wrote it (no stem column; the same run's footer): rebuilt, nothing embedded
    path = out / "_embeddings" / "00000.parquet"
    old = pq.read_table(path)
    pq.write_table(old.drop_columns(["shard_"]).replace_schema_metadata(old.schema.metadata), path)
    assert validate_output(config, str(out / "00000.parquet"), dim=results[0].dim).problems
    assert [r.cached for r in embedder(str(data), str(out))] == [True, True]
    assert pq.read_table(path).equals(old)


def test_a_batch_added_to_output_with_other_embedding_or_error_column_names_is_refused(tmp_path):
    """A dataset that grows batch by batch into one OUTPUT: a second batch run with another --error-column (or,
    without views, another --embedding-column) was accepted, and the README's merged read of OUTPUT then held two
    error (or embedding) columns, each null in the other batch's rows: `df[df.embedding_error.isna()]` kept the new
    batch's failed rows, with no embedding. Refused before any work, naming the outputs and the column; the same
    names are fine, and the merged read then keeps only embedded rows."""
    from wdsembed.inputs import InputError

    write_shard(tmp_path / "a", "00000", [_image(i) for i in range(4)], failed_rows=1)
    write_shard(tmp_path / "b", "00001", [_image(10 + i) for i in range(4)], failed_rows=1, shard_id=1)
    out = tmp_path / "out"

    def embed(batch: str, **kw):
        return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0, **kw)(str(tmp_path / batch), str(out))

    embed("a")
    for kw, said in ((dict(error_column="why"), "00000.parquet (error column embedding_error)"),
                     (dict(knn_view=False, error_column="why"), "00000.parquet (error column embedding_error)"),
                     (dict(knn_view=False, embedding_column="emb"), f"00000.parquet (embedding column {EMB})")):
        with pytest.raises(InputError, match=re.escape(said)):
            embed("b", **kw)
        assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"], kw
    embed("b")
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(out), format="parquet")
    schema = pa.unify_schemas([f.physical_schema for f in dataset.get_fragments()])
    df = ds.dataset(str(out), format="parquet", schema=schema).to_table().to_pandas()
    ok = df[df.embedding_error.isna()]
    assert len(df) == 10 and len(ok) == 8 and np.stack(ok[EMB].to_numpy()).shape[0] == 8
