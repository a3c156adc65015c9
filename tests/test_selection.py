"""Which shards a run embeds (wdsembed.inputs.find_shards / plan.plan_shards): a folder, recursive folders, brace patterns,
one .tar, list files; and that every shard gets an output of its own that caching, the manifest and validation
agree on. Local here; the same against an S3 server in tests/test_s3.py."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

import fsspec
import pyarrow.parquet as pq
import pytest

from wdsembed import inputs, output, plan
from wdsembed.config import EmbedConfig
from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

TINY_MODEL = "test_resnet.r160_in1k"


def shard(folder: Path, stem: str, n: int = 2, seed: int = 0) -> Path:
    images = [ShardSample(encode_image(make_image(32, 24, seed=seed * 100 + i), "bmp"), ext="bmp") for i in range(n)]
    return write_shard(folder, stem, images, shard_id=seed).tar


def config(input, out, **kw) -> EmbedConfig:
    return EmbedConfig(input=str(input), output=str(out), model_name=TINY_MODEL, pretrained=False, device="cpu",
                       batch_size=4, num_threads_per_worker=1, **kw)


def stems(plans) -> list[str]:
    return [p.stem for p in plans]


@pytest.fixture
def tree(tmp_path) -> Path:
    """data/00000..00003.tar at the top, data/train/00000.tar and data/val/00000.tar (same names, other folders),
    data/train/deep/00007.tar, and a hidden data/.cache/00009.tar."""
    data = tmp_path / "data"
    for i in range(4):
        shard(data, f"{i:05d}", seed=i)
    shard(data / "train", "00000", seed=10)
    shard(data / "val", "00000", seed=20)
    shard(data / "train" / "deep", "00007", seed=30)
    shard(data / ".cache", "00009", seed=40)
    return data


def test_input_kinds():
    assert inputs.input_kind("/data") == "folder"
    assert inputs.input_kind("s3://b/p/{00000..00009}.tar") == "pattern"
    assert inputs.input_kind("/data/{a,b}/00000.tar") == "pattern"
    assert inputs.input_kind("/data/00000.tar") == "tar"
    assert inputs.input_kind("/data/shards.txt") == "list"
    assert inputs.input_folder("s3://b/p/{00000..00009}.tar") == "s3://b/p"
    assert inputs.input_folder("/data/shard-{0..9}.tar") == "/data"
    assert inputs.input_folder("/data/{train,val}/00000.tar") == "/data"
    assert inputs.input_folder("/data/shards.txt") == "/data"


def test_folder_alone_takes_its_own_shards_and_recursive_the_subfolders(tree, tmp_path):
    out = tmp_path / "out"
    assert stems(plan.plan_shards(config(tree, out))) == ["00000", "00001", "00002", "00003"]
    plans = plan.plan_shards(config(tree, out, recursive=True))
    # hidden folders are skipped; same-named shards of two folders get two outputs that mirror the folders
    assert stems(plans) == ["00000", "00001", "00002", "00003", "train/00000", "train/deep/00007", "val/00000"]
    by_stem = {p.stem: p for p in plans}
    assert by_stem["train/00000"].output == str(out / "train" / "00000.parquet")
    assert by_stem["val/00000"].output == str(out / "val" / "00000.parquet")
    assert by_stem["train/00000"].rows == str(tree / "train" / "00000.parquet")  # its own img2dataset sibling
    assert by_stem["train/deep/00007"].expected_samples == 2
    assert len({p.output for p in plans}) == len(plans)


def test_a_folder_whose_shards_are_in_subfolders_says_recursive(tmp_path):
    data = tmp_path / "data"
    shard(data / "a", "00000")
    shard(data / "b", "00000")
    with pytest.raises(inputs.InputError, match=r"holds no \*\.tar shards directly, but its subfolders hold 2 "
                                              r"\(e\.g\. a/00000\.tar\): pass --recursive \(recursive=True\)"):
        plan.plan_shards(config(data, tmp_path / "out"))
    assert stems(plan.plan_shards(config(data, tmp_path / "out", recursive=True))) == ["a/00000", "b/00000"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(inputs.InputError, match=r"holds no \*\.tar shards$"):
        plan.plan_shards(config(tmp_path / "empty", tmp_path / "out"))


def test_compressed_shards_are_refused_by_name_never_left_out(tmp_path):
    """WebDataset reads `.tar.gz` and `.tgz` shards; DALI's reader, and this run, plain tars only. A folder holding
    some beside plain ones would lose their images without a word: refused, naming them and what to do. One whose
    plain tar is there too (decompressed with `gunzip -k`) is no loss."""
    data, out = tmp_path / "data", tmp_path / "out"
    shard(data, "00000")
    shard(data, "00001")
    (data / "00001.tar.gz").write_bytes(b"\x1f\x8b" + bytes(30))  # its plain tar is there: nothing is lost
    (data / "00002.tgz").write_bytes(b"\x1f\x8b" + bytes(30))
    shard(data / "sub", "00003")
    (data / "sub" / "00004.TAR.GZ").write_bytes(b"\x1f\x8b" + bytes(30))
    for recursive, named in ((False, "00002.tgz"), (True, "00002.tgz, sub/00004.TAR.GZ")):
        with pytest.raises(inputs.InputError) as err:
            plan.plan_shards(config(data, out, recursive=recursive))
        assert str(err.value) == (
            f"input {str(data)!r} holds {named.count(',') + 1} compressed shard(s) that this run would not read: "
            f"{named}. DALI reads plain *.tar only: decompress each beside itself (gzip -dc 00002.tgz > 00002.tar), "
            "or name the *.tar shards alone with a brace pattern or a list file")
    (data / "00002.tgz").unlink()
    assert stems(plan.plan_shards(config(data, out))) == ["00000", "00001"]
    with pytest.raises(inputs.InputError, match=r"is a compressed shard, which this run does not read: DALI reads "
                                              r"plain \*\.tar only: decompress it"):
        plan.plan_shards(config(data / "00001.tar.gz", out))
    with pytest.raises(inputs.InputError, match=r"names '.*00000\.tar\.gz', which is not a \.tar shard; it is a "
                                              r"compressed shard, .*\(gzip -dc 00000\.tar\.gz > 00000\.tar\)"):
        plan.plan_shards(config(f"{data}/{{00000..00001}}.tar.gz", out))


def test_hidden_tars_are_skipped_with_and_without_recursive(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shard(data, "00000")
    apple_double = b"\x00\x05\x16\x07" + bytes(4092)  # the ._ file macOS writes beside each file it copies
    (data / "._00000.tar").write_bytes(apple_double)
    assert stems(plan.plan_shards(config(data, out))) == ["00000"]
    assert stems(plan.plan_shards(config(data, out, recursive=True))) == ["00000"]
    # hidden ones only: no shards, and no advice to pass --recursive for the hidden subfolder's
    only = tmp_path / "only"
    shard(only / ".cache", "00001")
    (only / "._00001.tar").write_bytes(apple_double)
    with pytest.raises(inputs.InputError, match=r"holds no \*\.tar shards$"):
        plan.plan_shards(config(only, out))


def test_brace_patterns(tree, tmp_path):
    out = tmp_path / "out"
    plans = plan.plan_shards(config(f"{tree}/{{00001..00003}}.tar", out))
    assert stems(plans) == ["00001", "00002", "00003"]
    assert plans[0].rows == str(tree / "00001.parquet") and plans[0].output == str(out / "00001.parquet")
    plans = plan.plan_shards(config(f"{tree}/{{train,val}}/00000.tar", out))
    assert stems(plans) == ["train/00000", "val/00000"]
    assert [p.output for p in plans] == [str(out / "train" / "00000.parquet"), str(out / "val" / "00000.parquet")]
    with pytest.raises(inputs.InputError, match=r"2 of the 6 shard\(s\) that input .* names do not exist: "
                                              rf"{tree}/00004\.tar, {tree}/00005\.tar$"):
        plan.plan_shards(config(f"{tree}/{{00000..00005}}.tar", out))
    with pytest.raises(inputs.InputError, match="unbalanced braces"):
        plan.plan_shards(config(f"{tree}/{{00000..00005.tar", out))
    with pytest.raises(inputs.InputError, match="which is not a .tar shard"):
        plan.plan_shards(config(f"{tree}/{{train,val}}", out))


def test_a_wildcard_is_refused_saying_so(tree, tmp_path):
    """A quoted shell wildcard ('/data/*.tar'), as INPUT or a list file's line, was taken as the name of one shard,
    and refused as '1 of the 1 shard(s) ... do not exist: /data/*.tar'. Now it is said to be a wildcard, with what
    to pass instead."""
    with pytest.raises(inputs.InputError, match=rf"^input '{tree}/\*\.tar' is a wildcard pattern, which is not "
                                              r"expanded: name the shards with a brace pattern "
                                              rf"\('{tree}/\{{00000\.\.00099\}}\.tar'\), or pass the folder that "
                                              rf"holds them \('{tree}'\)$"):
        plan.check_config(config(f"{tree}/*.tar", tmp_path / "out"))
    listing = tmp_path / "shards.txt"
    listing.write_text("data/train/*.tar\n")
    with pytest.raises(inputs.InputError, match=r"shards\.txt line 1: 'data/train/\*\.tar' is a wildcard pattern"):
        plan.plan_shards(config(listing, tmp_path / "out"))


def test_a_local_folder_or_shard_whose_name_holds_a_star_is_what_it_names_not_a_wildcard(tmp_path):
    """`*` is a legal character of a file name: a folder `best*photos` that exists, or a shard `a*b.tar` named in a
    pattern or a list, was refused as a wildcard pattern, with a folder to pass that holds none of the shards."""
    data = tmp_path / "best*photos"
    for stem in ("a*b", "c"):
        shard(data, stem)
    out = tmp_path / "out"
    for input in (data, f"{data}/", f"file://{data}", f"{data}/{{a*b,c}}.tar"):
        assert stems(plan.plan_shards(config(input, out))) == ["a*b", "c"], input
    listing = tmp_path / "shards.txt"
    listing.write_text("best*photos/a*b.tar\nbest*photos/c.tar\n")
    assert stems(plan.plan_shards(config(listing, out))) == ["a*b", "c"]
    [one] = plan.plan_shards(config(data / "a*b.tar", out))
    assert one.shard == str(data / "a*b.tar") and one.output == str(out / "a*b.parquet")
    plan.check_config(config(data, out))  # the command's checks pass it too
    with pytest.raises(inputs.InputError, match=r"is a wildcard pattern"):  # what exists nowhere is one still
        plan.plan_shards(config(f"{data}/*.tar", out))


def test_a_local_name_with_braces_that_exists_is_what_it_names_not_a_pattern(tmp_path):
    """Braces are legal in file names: a folder `runs{1,2}`, or a shard `a{b,c}.tar`, `x{1..2}.tar`, `c{.tar` or
    `b}.tar` that exists, as INPUT or a list line, was brace-expanded (into names that did not exist) or refused for
    its unbalanced braces. A name that exists as written is what it names, even beside the shards its braces would
    expand to; one that does not is a pattern still, and one with unbalanced braces is refused still. Embedded end
    to end into an OUTPUT whose name holds braces and `*` too."""
    from wdsembed.api import TimmImageEmbedder

    data = tmp_path / "runs{1,2}"
    names = ["a{b,c}", "b}", "c{", "x{1..2}"]
    for i, stem in enumerate(names):
        shard(data, stem, seed=i)
    out = tmp_path / "out"
    assert stems(plan.plan_shards(config(data, out))) == names
    for stem in names:
        [one] = plan.plan_shards(config(data / f"{stem}.tar", out))
        assert (one.shard, one.rows, one.output) == (str(data / f"{stem}.tar"), str(data / f"{stem}.parquet"),
                                                     str(out / f"{stem}.parquet"))
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"runs{{1,2}}/{stem}.tar\n" for stem in names))
    assert stems(plan.plan_shards(config(listing, out))) == names
    pair = tmp_path / "pair"
    for stem in ("{a,b}", "a", "b"):
        shard(pair, stem)
    assert stems(plan.plan_shards(config(pair / "{a,b}.tar", out))) == ["{a,b}"]
    assert stems(plan.plan_shards(config(f"{pair}/{{b,a}}.tar", out))) == ["a", "b"]  # no such name: a pattern
    for missing in ("d{.tar", "e}.tar", "f{"):
        with pytest.raises(inputs.InputError, match="unbalanced braces"):
            plan.plan_shards(config(data / missing, out))
    plan.check_config(config(data / "a{b,c}.tar", out))  # the command's checks pass it too
    [result] = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0)(str(data / "x{1..2}.tar"), str(tmp_path / "emb {1,2}*"))
    assert (result.stem, result.rows, result.embedded) == ("x{1..2}", 2, 2)
    assert pq.read_table(tmp_path / "emb {1,2}*" / "x{1..2}.parquet").num_rows == 2


PIPE_SAID = ("is WebDataset's 'pipe:' form (a shell command whose output is read as the shard), which is not run "
             "here: each worker opens its shards itself, through fsspec. Pass the path or URL that the command reads "
             "(a local path, s3://BUCKET/PREFIX/00000.tar, https://HOST/00000.tar), with --storage-option "
             "(storage_options=) for the store's settings")
JOINED_SAID = ("joins shard lists with '::', as WebDataset does, but to fsspec '::' chains filesystems "
               "(simplecache::s3://...): what it names is no shard. Write the shards of each, one path, URL or brace "
               "pattern per line, in a .txt file and pass that file")


def test_webdatasets_pipe_and_joined_lists_are_refused_saying_why(tree, tmp_path):
    """WebDataset's `pipe:curl ...` URLs and its `a/{00000..00009}.tar::b/{00000..00009}.tar` lists were refused as
    shards that do not exist ('input /work/pipe:cat /data does not exist', or 'Protocol not known: pipe:curl -s http'
    from the store check): said now for what they are, with what to pass instead, as INPUT and as a list file's line.
    fsspec's own chains (simplecache::file:///...) still run."""
    from pydantic import ValidationError

    a, b = tree / "00000.tar", tree / "00001.tar"
    for given in (f"pipe:cat {a}", "pipe:curl -s http://127.0.0.1:9/00000.tar"):
        with pytest.raises(ValidationError, match=re.escape(PIPE_SAID)):
            config(given, tmp_path / "out")
    with pytest.raises(ValidationError, match=re.escape(PIPE_SAID)):
        config(tree, "pipe:aws s3 cp - s3://b/out")
    for given in (f"{a}::{b}", f"{tree}/{{00000..00001}}.tar::{tree}/val/{{00000..00000}}.tar",
                  f"file://{a}::file://{b}"):
        with pytest.raises(ValidationError, match=re.escape(JOINED_SAID)):
            config(given, tmp_path / "out")
    listing = tmp_path / "shards.txt"
    for line, said in ((f"pipe:cat {a}", PIPE_SAID), (f"{a}::{b}", JOINED_SAID)):
        listing.write_text(f"{b}\n{line}\n")
        with pytest.raises(inputs.InputError, match=re.escape(f"{listing} line 2: {said}")):
            plan.plan_shards(config(listing, tmp_path / "out"))
    [p] = plan.plan_shards(config(f"simplecache::file://{a}", tmp_path / "out"))
    assert p.stem == "00000"


def test_a_percent_escaped_file_url_is_taken_as_fsspec_takes_it_or_refused_saying_so(tmp_path):
    """`file:///data/my%20data` (a file manager's or a browser's copy of a path with a blank): fsspec keeps `%20`
    as it is, and so does the run, whose workers read through fsspec. Where no such folder exists but `/data/my data`
    does, the run said only 'does not exist'; an OUTPUT so spelled was a new folder `my%20out`, made without a word.
    Both refused now before any work, naming the path meant; a folder really named `lit%20dir` is read as named."""
    data = tmp_path / "my data"
    shard(data, "00000")
    escaped = f"file://{tmp_path}/my%20data"
    for given, meant in ((escaped, data), (f"{escaped}/00000.tar", data / "00000.tar"),
                         (f"{escaped}/{{00000..00000}}.tar", f"{data}/{{00000..00000}}.tar"),
                         (f"{tmp_path}/my%20data", data)):
        with pytest.raises(inputs.InputError, match=re.escape(
                f"input {given!r} does not exist: fsspec, which reads the shards, takes its %-escapes as they are "
                f"written ('%20' as those three characters, not as what they encode), and {str(meant)!r}, what "
                "they encode, exists: pass that path")):
            plan.check_config(config(given, tmp_path / "out"))
    out = f"file://{tmp_path}/out%20put"
    with pytest.raises(inputs.InputError, match=re.escape(
            f"output {out!r} holds %-escapes, which fsspec writes as they are: the run would create a folder named "
            f"{str(tmp_path / 'out%20put')!r}; pass the path meant, as it is spelled on disk "
            f"({str(tmp_path / 'out put')!r}), or create that folder first to write there")):
        plan.check_config(config(data, out))
    assert not (tmp_path / "out%20put").exists() and not (tmp_path / "out put").exists()
    literal = tmp_path / "lit%20dir"
    shard(literal, "00000")
    (tmp_path / "made%20out").mkdir()
    [p] = plan.plan_shards(config(f"file://{literal}", f"file://{tmp_path}/made%20out"))
    assert p.shard == str(literal / "00000.tar") and p.output == str(tmp_path / "made%20out" / "00000.parquet")


def test_one_tar(tree, tmp_path):
    [p] = plan.plan_shards(config(tree / "train" / "00000.tar", tmp_path / "out"))
    assert p.stem == "00000" and p.rows == str(tree / "train" / "00000.parquet")


def test_list_file(tree, tmp_path):
    listing = tree / "train" / "shards.txt"
    listing.write_text("# the shards of this run\n"
                       "00000.tar\n"                                 # relative to the list file's folder
                       "\n"
                       f"{tree}/val/00000.tar\n"                     # absolute
                       f"  {tree}/{{00001..00002}}.tar  \n"          # a pattern, spaces around
                       "deep/00007.tar\n"
                       "00000.tar\n")                                # named twice: embedded once
    plans = plan.plan_shards(config(listing, tmp_path / "out"))
    # stems are relative to the deepest folder holding them all
    assert stems(plans) == ["00001", "00002", "train/00000", "train/deep/00007", "val/00000"]
    listing.write_text("00000.tar\n00000.parquet\n")
    with pytest.raises(inputs.InputError, match=r"shards\.txt line 2: '.*00000\.parquet' is not a \.tar shard"):
        plan.plan_shards(config(listing, tmp_path / "out"))
    listing.write_text("# nothing\n")
    with pytest.raises(inputs.InputError, match="names no shards"):
        plan.plan_shards(config(listing, tmp_path / "out"))
    with pytest.raises(inputs.InputError, match="does not exist: pass a folder of"):
        plan.plan_shards(config(tree / "nope.txt", tmp_path / "out"))


def test_a_list_file_line_with_a_tilde_or_a_file_url_names_that_path(tree, tmp_path, monkeypatch):
    """A local list file's line `~/data/00000.tar` is in the home folder, as INPUT's `~` is, not in a folder `~`
    beside the list; `file:/data/00001.tar` and `file://localhost/data/00002.tar` are /data/..., as INPUT's are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    listing = tree / "train" / "shards.txt"
    listing.write_text(f"~/data/00000.tar\n~/data/val/{{00000..00000}}.tar\nfile:{tree}/00001.tar\n"
                       f"file://localhost{tree}/00002.tar\n")
    plans = plan.plan_shards(config(listing, tmp_path / "out"))
    assert stems(plans) == ["00000", "00001", "00002", "val/00000"]
    assert [p.shard for p in plans] == [str(tree / "00000.tar"), str(tree / "00001.tar"), str(tree / "00002.tar"),
                                        str(tree / "val" / "00000.tar")]


def test_a_list_file_line_with_a_password_is_refused_without_echoing_it(tree, tmp_path):
    """INPUT and OUTPUT with a password are refused (tests/test_s3.py); a list file's lines are URLs too, each of
    which goes to the log lines, the outputs' footers and the manifest: one with a password is refused before the
    store is asked, by its line number, never echoed."""
    listing = tree / "shards.txt"
    listing.write_text("# from the web store\nhttp://me:hunter2@127.0.0.1:9/shards/00001.tar\n")
    with pytest.raises(inputs.InputError) as err:
        plan.plan_shards(config(listing, tmp_path / "out"))
    assert str(err.value).startswith(f"{listing} line 2: the URL holds a password, which would be logged and stored")
    assert "hunter2" not in str(err.value)
    listing.write_text("s3://AKIAIOSFODNN7EXAMPLE@bucket/shards/00001.tar\n")  # a user name alone: a key ID
    with pytest.raises(inputs.InputError) as err:
        plan.plan_shards(config(listing, tmp_path / "out"))
    assert str(err.value).startswith(f"{listing} line 1: the URL holds a user name, which would be logged and stored")
    assert "AKIAIOSFODNN7EXAMPLE" not in str(err.value)


def test_local_paths_spelled_with_double_slashes_or_dot_parts_name_the_listed_files(tree, tmp_path):
    """A folder's listing spells its files plainly: a pattern or .tar path with `//` (ROOT=/data/ then
    "$ROOT/{00000..00001}.tar"), `./` or `x/..` names those same files, and the shards are spelled as listed."""
    out = tmp_path / "out"
    for spelled in (f"{tree}//{{00000..00001}}.tar", f"{tree}/./{{00000..00001}}.tar",
                    f"{tree}/train/../{{00000..00001}}.tar"):
        plans = plan.plan_shards(config(spelled, out))
        assert stems(plans) == ["00000", "00001"], spelled
        assert [p.shard for p in plans] == [str(tree / "00000.tar"), str(tree / "00001.tar")], spelled
        assert plans[0].rows == str(tree / "00000.parquet") and plans[0].output == str(out / "00000.parquet")
    [p] = plan.plan_shards(config(f"{tree}//train//00000.tar", out))
    assert (p.shard, p.stem) == (str(tree / "train" / "00000.tar"), "00000")
    assert p.rows == str(tree / "train" / "00000.parquet")


def test_a_shard_named_twice_in_two_spellings_is_embedded_once(tree, tmp_path):
    listing = tree / "shards.txt"
    listing.write_text("00000.tar\n./00000.tar\n"  # e.g. a list merged from `ls` and `find .`
                       f"train/../00000.tar\n{tree}//00000.tar\n00001.tar\n")
    plans = plan.plan_shards(config(listing, tmp_path / "out"))
    assert stems(plans) == ["00000", "00001"]
    assert [p.shard for p in plans] == [str(tree / "00000.tar"), str(tree / "00001.tar")]


def test_symbolic_links_to_shards_and_their_parquets_are_the_files_they_name(tree, tmp_path):
    """A folder of symbolic links to shards kept elsewhere (a subset picked from a dataset, another disk) is a folder
    of those shards, in every kind of input, and a link to a shard's img2dataset parquet is its parquet. fsspec
    lists a link as 'other', not 'file': such a folder was refused as holding no shards ('but its subfolders hold
    2'), each link named by a pattern, .tar or list file was said not to exist, and a linked parquet beside a real
    tar was passed over without a word, its columns (caption, url, ...) missing from the output. A dangling link
    is still no shard."""
    from wdsembed.nemo import ImageTextPairDataset

    links, out = tmp_path / "links", tmp_path / "out"
    links.mkdir()
    os.utime(tree / "00000.tar", (1_700_000_000, 1_700_000_000))
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00001.parquet"):
        (links / name).symlink_to(tree / name)
    (links / "00002.tar").symlink_to(tree / "gone.tar")  # dangling
    listing = tmp_path / "links.txt"
    listing.write_text(f"{links}/00000.tar\n{links}/00001.tar\n")
    for input in (links, f"{links}/{{00000..00001}}.tar", listing):
        plans = plan.plan_shards(config(input, out))
        assert stems(plans) == ["00000", "00001"], input
        assert plans[0].shard == str(links / "00000.tar") and plans[0].rows == str(links / "00000.parquet"), input
        # the cache key is the linked file's: rewriting it recomputes the shard
        assert plans[0].fingerprint.split("|")[0] == f"{(tree / '00000.tar').stat().st_size}--1700000000.0", input
    assert stems(plan.plan_shards(config(links, out, recursive=True))) == ["00000", "00001"]
    [one] = plan.plan_shards(config(links / "00001.tar", out))
    assert one.rows == str(links / "00001.parquet")
    with pytest.raises(inputs.InputError, match=r"1 of the 1 shard\(s\) .* do not exist"):
        plan.plan_shards(config(links / "00002.tar", out))
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "00000.tar").symlink_to(tree / "gone.tar")
    with pytest.raises(inputs.InputError, match=r"holds no \*\.tar shards$"):
        plan.plan_shards(config(dangling, out))
    assert ImageTextPairDataset.from_webdataset(str(links)).tar_files == [str(links / "00000.tar"),
                                                                         str(links / "00001.tar")]

    mixed = tmp_path / "mixed"  # a real tar beside a link to its parquet
    mixed.mkdir()
    (mixed / "00000.tar").write_bytes((tree / "00000.tar").read_bytes())
    (mixed / "00000.parquet").symlink_to(tree / "00000.parquet")
    [p] = plan.plan_shards(config(mixed, out))
    assert p.rows == str(mixed / "00000.parquet")


def test_outputs_never_collide(tmp_path):
    data = tmp_path / "data"
    shard(data, "x")
    os.rename(data / "x.tar", data / "x.TAR")
    shard(data, "x", seed=1)
    with pytest.raises(inputs.InputError, match=r"would both write OUTPUT/x\.parquet: rename one"):
        plan.plan_shards(config(data, tmp_path / "out"))
    other = tmp_path / "other"
    shard(other / output.EMBEDDINGS_FOLDER, "00000")
    with pytest.raises(inputs.InputError, match="inside a folder OUTPUT keeps for itself"):
        plan.plan_shards(config(other, tmp_path / "out", recursive=True))


def test_a_shard_whose_output_name_no_file_system_takes_is_refused_before_any_work(tmp_path):
    """A tar's name may take 255 bytes; its output's, `.parquet` for `.tar`, then takes 4 more. Such a shard failed
    alone, after embedding, with messages about the earlier output it could not remove; it is now refused in the
    planning, naming it. One of 255 bytes as an output is embedded."""
    data, out = tmp_path / "data", tmp_path / "out"
    images = [ShardSample(encode_image(make_image(32, 24, seed=0), "bmp"), ext="bmp")]
    # tars alone: img2dataset's <stem>_stats.json beside them would take 7 bytes more than the output's name
    write_shard(data, "é" * 123 + "x", images, parquet=False, stats=False)  # 247 bytes: 255 with .parquet
    assert [len(p.stem.encode()) for p in plan.plan_shards(config(data, out))] == [247]
    longest = "é" * 125 + "x"  # 251 bytes: the tar's name is 255, the output's would be 259
    write_shard(data, longest, images, parquet=False, stats=False)
    with pytest.raises(inputs.InputError, match=rf"^shard {data}/{longest}\.tar would write OUTPUT/{longest}\.parquet, "
                                              r"a file name of 259 bytes, over the 255 a file system allows: rename "
                                              r"the shard$"):
        plan.check_config(config(data, out))


def test_shards_whose_outputs_dataset_readers_would_skip_are_refused_naming_them(tmp_path):
    """pyarrow.dataset, pandas.read_parquet and Spark skip every file or folder under OUTPUT whose name starts with
    '_' or '.': a shard written there would vanish from OUTPUT read as one dataset. Refused before any work, naming
    the shard and what to rename; only the path below the input's folder counts."""
    data, out = tmp_path / "data", tmp_path / "out"
    shard(data, "00000")
    shard(data / "_extra", "00001", seed=1)
    assert stems(plan.plan_shards(config(data, out))) == ["00000"]  # without recursive, the subfolder is not read
    for input, kw in ((data, {"recursive": True}), (f"{data}/{{00000,_extra/00001}}.tar", {})):
        with pytest.raises(inputs.InputError, match=rf"^shard {data}/_extra/00001\.tar would write "
                                                  r"OUTPUT/_extra/00001\.parquet, which pyarrow\.dataset, "
                                                  r"pandas\.read_parquet and Spark skip .*: its rows would vanish "
                                                  r"from OUTPUT read as a dataset; rename its folder '_extra' to a "
                                                  r"name that does not start with '_'$"):
            plan.check_config(config(input, out, **kw))
    shard(tmp_path / "flat", "_00002", seed=2)
    with pytest.raises(inputs.InputError, match=r"rename the shard '_00002\.tar' to a name that does not start "
                                              r"with '_'$"):
        plan.plan_shards(config(tmp_path / "flat", out))
    listing = tmp_path / "named.txt"
    listing.write_text(f"{data}/00000.tar\n{data}/.x.tar\n")
    (data / ".x.tar").write_bytes((data / "00000.tar").read_bytes())
    with pytest.raises(inputs.InputError, match=r"rename the shard '\.x\.tar' to a name that does not start with "
                                              r"'\.'$"):
        plan.plan_shards(config(listing, out))
    assert sorted(p.name for p in tmp_path.rglob("*.idx")) == ["00000.idx"]  # of the first, accepted, run only
    assert not out.exists()
    # named from inside `_extra`, its shard's path below the input's folder is 00001: read by every reader
    assert stems(plan.plan_shards(config(data / "_extra" / "00001.tar", out))) == ["00001"]


def test_check_config_knows_every_kind(tree, tmp_path):
    plan.check_config(config(f"{tree}/{{00000..00003}}.tar", tmp_path / "out"))
    plan.check_config(config(tree, tmp_path / "out", recursive=True))
    with pytest.raises(inputs.InputError, match="names do not exist"):
        plan.check_config(config(f"{tree}/{{00000..00009}}.tar", tmp_path / "out"))
    with pytest.raises(inputs.InputError, match="a folder of the shards that input"):
        plan.check_config(config(f"{tree}/{{00000..00003}}.tar", tree))
    shard(tmp_path / "nest" / "a", "00000")
    with pytest.raises(inputs.InputError, match=r"pass --recursive \(recursive=True\)"):
        plan.check_config(config(tmp_path / "nest", tmp_path / "out"))


def test_output_is_refused_where_it_could_be_read_as_shards_or_overwrite_their_parquets(tree, tmp_path):
    """A folder input refuses OUTPUT inside it (a later or recursive run would read the outputs); shards named one
    by one read only what they name, so only OUTPUT in one of their folders is refused (below one too, with
    recursive), or one that puts a shard's OUTPUT/<stem>.parquet there. plan_shards (the API, the NeMo drop-in)
    refuses as check_config (the CLI, the flow) does, before any .idx is written."""
    (tmp_path / "link").symlink_to(tree)
    for out in (tree, tree / "emb", tmp_path / "link" / "emb", f"{tree}/./emb/"):
        for recursive in (False, True):
            with pytest.raises(inputs.InputError, match=r"is inside input .*: choose a folder outside it"):
                plan.check_config(config(tree, out, recursive=recursive))
    both = f"{tree}/{{train,val}}/00000.tar"  # stems train/00000 and val/00000
    for out in (tree, tree / "train", tmp_path / "link" / "val"):
        with pytest.raises(inputs.InputError, match=r"would write into .*, a folder of the shards that input"):
            plan.check_config(config(both, out))
    with pytest.raises(inputs.InputError, match=r"would write into .*/train, a folder of the shards that input"):
        plan.check_config(config(both, tree / "train" / "emb", recursive=True))
    for out in (tree / "emb", tree / "train" / "emb", tree / "train" / "deep", tmp_path / "out"):
        plan.check_config(config(both, out))
    for input in (tree / "00000.tar", tree / "train/{00000..00000}.tar"):
        with pytest.raises(inputs.InputError, match="a folder of the shards"):
            plan.plan_shards(config(input, Path(str(input)).parent))
    with pytest.raises(inputs.InputError, match="is inside input"):
        plan.plan_shards(config(tree, tree / "emb"))
    assert not list(tree.rglob("*.idx")) and not (tree / "emb").exists()


def test_a_folder_the_run_writes_other_files_in_is_refused_inside_output_unless_readers_skip_it(tree, tmp_path):
    """Prefect's results (`result_storage`) and `.idx` files (`index_cache_dir`) are no parquet: in a folder of
    OUTPUT that readers of OUTPUT as one dataset take in, `pyarrow.dataset.dataset(OUTPUT)` and
    `pd.read_parquet(OUTPUT)` failed on them ("Parquet magic bytes not found in footer"). Refused before any work
    there, OUTPUT itself included; a folder whose name starts with '_' or '.' (the default OUTPUT/_prefect_results)
    or one outside OUTPUT is fine."""
    out = tmp_path / "out"
    for field in ("result_storage", "index_cache_dir"):
        for inside in (out / "cache", out, f"{out}/./x/cache", out / "_ok" / ".." / "cache"):
            with pytest.raises(inputs.InputError, match=rf"{field.replace('_', ' ').replace('dir', 'folder')} .* is "
                                                        r"inside output .*: pyarrow.dataset, pandas.read_parquet and "
                                                        r"Spark.* a folder outside it, or one in it whose name "
                                                        r"starts with '_'"):
                plan.check_config(config(tree, out, **{field: str(inside)}))
        for fine in (out / "_cache", out / ".cache" / "x", out / "x" / "_cache", tmp_path / "elsewhere"):
            plan.check_config(config(tree, out, **{field: str(fine)}))
    assert not out.exists()


def test_list_input_output_beside_the_list_is_not_inside_the_input(tmp_path):
    """A list file naming shards of two folders (a/, b/): an output folder beside them and beside the list file
    is accepted; their common parent is no input folder (a list input never lists one)."""
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "a", n_shards=1, per_shard=2)
    write_demo_dataset(tmp_path / "b", n_shards=2, per_shard=2)
    (tmp_path / "b" / "00000.tar").unlink()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path}/a/00000.tar\n{tmp_path}/b/00001.tar\n")
    plan.check_config(config(listing, tmp_path / "emb"))


def test_list_input_over_two_top_level_folders_leaves_some_output_folder(tmp_path):
    """Shards on two disks (/tmp/... and /var/tmp/...) share only "/": an output folder of neither is accepted."""
    import shutil
    import tempfile

    from wdsembed.synthetic import write_demo_dataset

    other = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        write_demo_dataset(tmp_path / "a", n_shards=1, per_shard=2)
        write_demo_dataset(other, n_shards=2, per_shard=2)
        (other / "00000.tar").unlink()
        listing = tmp_path / "list.txt"
        listing.write_text(f"{tmp_path}/a/00000.tar\n{other}/00001.tar\n")
        plan.check_config(config(listing, tmp_path / "emb"))
    finally:
        shutil.rmtree(other, ignore_errors=True)


def _written_by(out: Path, stem: str, model: str, *, weights: str = "random-init", embedding: str = "pooled",
                normalized: bool = True, parts: Optional[dict] = None, **recorded) -> None:
    """An output as a run of `model` leaves it (only its footer matters here); `parts`: its cache key's parts;
    `recorded`: more of the footer's model record (embedding_forms, checkpoint)."""
    import fsspec
    import pyarrow as pa

    out.mkdir(parents=True, exist_ok=True)
    result = {"model": {"name": model, "weights": weights, "embedding": embedding, "dim": 8, **recorded}}
    metadata = {"cache_key": "k", "normalized": normalized, "result": result}
    if parts is not None:
        metadata["cache_key_parts"] = parts
    output.write_parquet_atomic(pa.table({"key": ["a"]}), str(out / f"{stem}.parquet"), fsspec.filesystem("file"),
                                metadata=metadata)


def test_outputs_of_another_model_beside_this_runs_are_refused_naming_them(tree, tmp_path):
    """OUTPUT holds outputs of shards this run does not name, made by another model (or the same one otherwise
    set): they would stay beside this run's, two embedding spaces in one folder and one kNN view. The run is refused
    before any work, naming them; outputs this run names (rewritten) and outputs of the same settings never count."""
    out = tmp_path / "out"
    one = config(tree / "00000.tar", out, embedding="pooled")
    _written_by(out, "00001", TINY_MODEL)  # this run's settings: fine
    _written_by(out, "00000", "test_vit.r160_in1k")  # another model, but rewritten by this run: fine
    (out / "notes.parquet").write_bytes(b"not ours")  # not an output of ours: not judged
    plan.check_config(one)
    plan.plan_shards(one, indexes=False)
    for stem, kind in (("00002", dict(model="test_vit.r160_in1k")), ("train/00000", dict(normalized=False)),
                       ("00003", dict(weights="pretrained:timm/x")), ("val/00000", dict(embedding="head"))):
        _written_by(out, stem, kind.pop("model", TINY_MODEL), **kind)
    with pytest.raises(inputs.InputError) as err:
        plan.check_config(one)
    text = str(err.value)
    assert "00002.parquet (model test_vit.r160_in1k)" in text and "00003.parquet (weights pretrained:timm/x)" in text
    assert "and 1 more" in text and "another output folder" in text and "00001" not in text
    with pytest.raises(inputs.InputError):
        plan.plan_shards(one, indexes=False)  # the Python API's and the flow's planning too
    # 'auto' is only resolved once the model loads: a head output is not judged against it
    for stem in ("00002", "train/00000", "00003"):
        (out / f"{stem}.parquet").unlink()
    plan.check_config(one.model_copy(update={"embedding": "auto"}))


def test_outputs_beside_whose_views_name_their_columns_otherwise_are_refused(tree, tmp_path):
    """Outputs of the same model, of shards this run does not name, whose kNN views hold another id or embedding
    column (a run with another --id-column or --embedding-column): this run's views beside them were accepted, and
    embedding-reader failed on the folder ('failed reading file .../_embeddings/00001.parquet'). Refused, naming
    them; a run without views writes none beside them."""
    import fsspec
    import pyarrow as pa

    out = tmp_path / "out"
    one = config(tree / "00000.tar", out, embedding="pooled")
    _written_by(out, "00001", TINY_MODEL)
    (out / "_embeddings").mkdir()
    view = pa.table({"key": ["a"], "image_embedding": [[1.0]], "shard": ["00001"]})
    output.write_parquet_atomic(view, str(out / "_embeddings" / "00001.parquet"), fsspec.filesystem("file"),
                                metadata={"cache_key": "k"})
    plan.check_config(one)
    refused = r"00001.parquet \(kNN view columns key, image_embedding\)"
    with pytest.raises(inputs.InputError, match=refused):
        plan.check_config(one.model_copy(update={"embedding_column": "emb"}))
    with pytest.raises(inputs.InputError, match=refused):  # (the first shard's parquet has no 'uid': the check alone)
        plan.check_outputs_beside(one.model_copy(update={"id_column": "uid"}), inputs.find_shards(one))
    plan.check_config(one.model_copy(update={"embedding_column": "emb", "knn_view": False}))


def test_outputs_beside_stored_in_another_embedding_dtype_are_refused(tree, tmp_path):
    """A dataset that grows: its first shards embedded as float32, one of them dropped from INPUT since (its output
    stays, an earlier run's), then a run with --embedding-dtype float16 over the shards still there. It was
    accepted, and left list<float> and list<halffloat> embeddings in one folder and one kNN view: the README's
    merged-schema read of OUTPUT failed ("Unable to merge: Field image_embedding has incompatible types"). Refused
    like another model's outputs, naming them; outputs of the run's own dtype are fine, footers that record no key
    parts (older versions) are not judged."""
    out = tmp_path / "out"
    half = config(tree / "00000.tar", out, embedding="pooled", embedding_dtype="float16")
    _written_by(out, "00001", TINY_MODEL, parts={"dtype": "float16"})
    _written_by(out, "00002", TINY_MODEL)  # no key parts recorded: not judged
    plan.check_config(half)
    _written_by(out, "00003", TINY_MODEL, parts={"shard": "x"})  # float32: a float32 key records no dtype
    with pytest.raises(inputs.InputError, match=r"00003.parquet \(embedding_dtype float32\)") as err:
        plan.check_config(half)
    assert "00001" not in str(err.value) and "00002" not in str(err.value)
    with pytest.raises(inputs.InputError, match=r"00001.parquet \(embedding_dtype float16\)") as err:
        plan.check_config(half.model_copy(update={"embedding_dtype": "float32"}))
    assert "00003" not in str(err.value)


def test_outputs_of_another_checkpoint_file_are_told_from_the_same_one_spelled_otherwise(tree, tmp_path,
                                                                                          monkeypatch):
    """Outputs made with a checkpoint: another file (or the same file rewritten since) is refused; the same file
    named otherwise (relative, through a link) is not. Footers from before the checkpoint's record are judged by
    the path in their weights alone."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "link.safetensors").symlink_to(weights)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    one = config(tree / "00000.tar", out, embedding="pooled", checkpoint="./w.safetensors")
    found = inputs.find_shards(one)
    same = {"path": str(weights), "fingerprint": output_fingerprint(weights)}
    _written_by(out, "00001", TINY_MODEL, weights=f"checkpoint:{weights}")  # an older footer: no record
    _written_by(out, "00002", TINY_MODEL, weights=f"checkpoint:{tmp_path / 'link.safetensors'}", checkpoint=same)
    plan.check_outputs_beside(one, found)
    plan.check_outputs_beside(one.model_copy(update={"checkpoint": str(tmp_path / "link.safetensors")}), found)
    _written_by(out, "00003", TINY_MODEL, weights=f"checkpoint:{tmp_path / 'other.safetensors'}")
    _written_by(out, "train/00000", TINY_MODEL, weights=f"checkpoint:{weights}",
                checkpoint={"path": str(weights), "fingerprint": "sha256:" + "0" * 64})  # the file was rewritten since
    with pytest.raises(inputs.InputError) as err:
        plan.check_outputs_beside(one, found)
    text = str(err.value)
    assert f"00003.parquet (weights checkpoint:{tmp_path / 'other.safetensors'} (another file))" in text
    assert "train/00000.parquet (weights checkpoint:" in text and "(the file has changed since)" in text
    assert "00001" not in text and "00002" not in text


def test_local_paths_are_made_absolute_where_the_config_is_made(tmp_path, monkeypatch):
    """A run's tasks may run on Dask workers started in another folder, or as another user (a shared cluster's
    `dask worker`): INPUT, OUTPUT, the checkpoint, the .idx cache and the result storage, given relative or with
    `~`, are made absolute where the config is made, from that process's folder and home. Absolute paths and other
    stores' URLs stay as given, a brace pattern's braces unnormalized. A relative checkpoint's cache key holds its
    absolute path (keys made with the checkpoint's size and mtime, before its content's hash, recompute once anyway),
    and is the same where a flow validates the config again and where a worker, in another folder, computes it."""
    import pickle

    from pydantic import BaseModel

    from wdsembed import shard as core

    shard(tmp_path / "data", "00000")
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    made = config("data", "./out/", checkpoint="w.safetensors", index_cache_dir="~/idx", result_storage="results")
    assert [made.input, made.output, made.checkpoint, made.index_cache_dir, made.result_storage] == [
        str(tmp_path / p) for p in ("data", "out", "w.safetensors", "home/idx", "results")]
    assert config("file://data/{00000..00001}.tar", "file://out").model_dump(include={"input", "output"}) == {
        "input": f"{tmp_path}/data/{{00000..00001}}.tar", "output": str(tmp_path / "out")}
    kept = config("s3://bucket/data", "/abs/out", result_storage="memory://results", checkpoint="file:///w.pth")
    assert [kept.input, kept.output, kept.result_storage, kept.checkpoint] == [
        "s3://bucket/data", "/abs/out", "memory://results", "/w.pth"]

    [planned] = plan.plan_shards(made, indexes=False, checks=False)
    key = core.cache_key(made, planned)
    assert core.cache_key_parts(made, planned)["model"]["checkpoint"] == str(tmp_path / "w.safetensors")

    class FlowParameters(BaseModel):  # as a Prefect flow validates its parameter again
        config: EmbedConfig

    assert FlowParameters.model_validate({"config": made}).config is made and core.cache_key(made, planned) == key
    monkeypatch.chdir(tmp_path / "data")  # a worker's folder
    assert core.cache_key(pickle.loads(pickle.dumps(made)), planned) == key


def test_file_urls_of_one_slash_or_of_localhost_name_their_absolute_path(tmp_path, monkeypatch):
    """`file:/data/x` (how Java, Hadoop and Spark print a local path) and `file://localhost/data/x` (RFC 8089) are
    /data/x, as fsspec reads the first: neither is a folder `file:` or `localhost` below the working directory,
    where a run would have written its outputs without a word."""
    shard(tmp_path / "data", "00000")
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for form in ("file:", "file://localhost", "FILE:", "local:"):
        made = config(f"{form}{tmp_path}/data", f"{form}{tmp_path}/out/", checkpoint=f"{form}{tmp_path}/w.safetensors",
                      index_cache_dir=f"{form}{tmp_path}/idx", result_storage=f"{form}{tmp_path}/results")
        assert [made.input, made.output, made.checkpoint, made.index_cache_dir, made.result_storage] == [
            f"file://{tmp_path}/data", f"file://{tmp_path}/out", str(tmp_path / "w.safetensors"),
            str(tmp_path / "idx"), f"file://{tmp_path}/results"], form
        [planned] = plan.plan_shards(made, indexes=False, checks=False)
        assert planned.shard == str(tmp_path / "data" / "00000.tar")
    made = config(f"file://localhost{tmp_path}/data/{{00000..00000}}.tar", tmp_path / "out")
    assert made.input == f"file://{tmp_path}/data/{{00000..00000}}.tar"
    assert not any(elsewhere.iterdir())


def _recorded_identity(weights: Path) -> str:
    """The checkpoint's identity as a run's cache key holds it, and so as its outputs' footers record it (the worker
    records what the key holds)."""
    from wdsembed.shard import ShardPlan, cache_key_parts

    one = config(weights.parent / "00000.tar", weights.parent / "out", checkpoint=str(weights))
    any_shard = ShardPlan(shard="00000.tar", stem="00000", fingerprint="1:2", rows=None, index=None, output="o")
    return cache_key_parts(one, any_shard)["checkpoint"]


def _copy_as_another_host_has_it(original: Path, at: Path, *, mtime: float) -> None:
    """`original`'s bytes at `at`, with another mtime and inode: a copy made on another host, by `cp` without -p or
    by a second download."""
    staged = at.with_name(at.name + ".part")
    staged.write_bytes(original.read_bytes())
    os.utime(staged, (mtime, mtime))
    os.replace(staged, at)


def test_a_copy_of_the_checkpoint_made_with_another_mtime_is_the_same_weights(tree, tmp_path):
    """A checkpoint is its bytes: copied again at its path with another mtime (another host's copy, a re-download,
    `cp` without -p), it has the same identity, so the same cache keys, and a later partial run with the copy
    accepts the outputs beside it that the original made. A copy at another path is the same weights too."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "out"
    one = config(tree / "00000.tar", out, embedding="pooled", checkpoint=str(weights))
    found = inputs.find_shards(one)
    made_with = _recorded_identity(weights)
    _written_by(out, "00001", TINY_MODEL, weights=f"checkpoint:{weights}",
                checkpoint={"path": str(weights), "fingerprint": made_with})
    plan.check_outputs_beside(one, found)

    _copy_as_another_host_has_it(weights, weights, mtime=weights.stat().st_mtime - 3600)
    assert _recorded_identity(weights) == made_with
    plan.check_outputs_beside(one, found)  # not "the file has changed since"

    elsewhere = tmp_path / "mounted" / "w.safetensors"
    elsewhere.parent.mkdir()
    _copy_as_another_host_has_it(weights, elsewhere, mtime=1_000_000_000)
    assert _recorded_identity(elsewhere) == made_with
    plan.check_outputs_beside(one.model_copy(update={"checkpoint": str(elsewhere)}), found)


def test_a_same_size_rewrite_of_the_checkpoint_is_other_weights_whatever_its_mtime(tree, tmp_path):
    """Other bytes of the same size written over the checkpoint, its mtime then set back (or within the file
    system's time resolution), are other weights: another identity, and the outputs the old bytes made are refused
    beside a run with the new ones. Also within one process that has already read the old bytes."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a" * (1 << 20))
    before = weights.stat()
    out = tmp_path / "out"
    one = config(tree / "00000.tar", out, embedding="pooled", checkpoint=str(weights))
    made_with = _recorded_identity(weights)
    _written_by(out, "00001", TINY_MODEL, weights=f"checkpoint:{weights}",
                checkpoint={"path": str(weights), "fingerprint": made_with})

    with open(weights, "r+b") as f:  # in place: the same inode
        f.write(b"b")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns, weights.stat().st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)
    assert _recorded_identity(weights) != made_with
    with pytest.raises(inputs.InputError, match=r"00001\.parquet \(weights checkpoint:.*\(the file has changed since\)"):
        plan.check_outputs_beside(one, inputs.find_shards(one))


def _bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_the_checkpoint_is_read_once_per_process_until_it_changes(tmp_path):
    """Hashing a checkpoint reads all of it (a ViT-L's is 1.2 GB): once per process, remembered by the file's stat,
    so that every shard's cache key and every Worker lease costs a stat. A changed stat reads it again. Counted in
    the bytes this process reads through read() (Linux's /proc/self/io)."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux's /proc/self/io")
    from wdsembed import storage

    weights = tmp_path / "w.safetensors"
    size = 16 << 20
    weights.write_bytes(os.urandom(size))

    def identity_and_bytes_read() -> tuple[str, int]:
        start = _bytes_read_by_this_process()
        identity = storage.checkpoint_identity(str(weights))
        return identity, _bytes_read_by_this_process() - start

    first, read = identity_and_bytes_read()
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert read >= size
    again, read = identity_and_bytes_read()
    assert (again, read < size // 4) == (first, True)  # a stat, not a read
    later = weights.stat().st_mtime + 60
    os.utime(weights, (later, later))  # touched: read again, the same bytes
    touched, read = identity_and_bytes_read()
    assert (touched, read >= size) == (first, True)


def test_outputs_recorded_with_the_old_checkpoint_fingerprint_are_judged_by_it(tree, tmp_path):
    """Footers written before a checkpoint's identity was its content record its size and mtime ("size:mtime"):
    judged by that rule still, they are accepted while the file's size and mtime are those recorded, and refused
    as changed otherwise, never taken for the content's identity nor failing the check. (Their cache key, which
    held the same old fingerprint, no longer matches: such a shard is recomputed once when a run names it.)"""
    from wdsembed import storage

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    out = tmp_path / "out"
    one = config(tree / "00000.tar", out, embedding="pooled", checkpoint=str(weights))
    found = inputs.find_shards(one)
    old_record = {"path": str(weights), "fingerprint": storage.file_fingerprint(str(weights))}
    _written_by(out, "00001", TINY_MODEL, weights=f"checkpoint:{weights}", checkpoint=old_record)
    plan.check_outputs_beside(one, found)
    later = weights.stat().st_mtime + 60
    os.utime(weights, (later, later))
    with pytest.raises(inputs.InputError, match=r"00001\.parquet \(weights checkpoint:.*\(the file has changed since\)"):
        plan.check_outputs_beside(one, found)


def output_fingerprint(path: Path) -> str:
    from wdsembed import storage

    return storage.checkpoint_identity(str(path))


def test_embedding_forms_recorded_with_outputs_judge_auto(tree, tmp_path):
    """An output that records what each request resolves to on its model is judged against this run's request,
    'auto' included; one without that record only against an explicit request."""
    out = tmp_path / "out"
    auto = config(tree / "00000.tar", out)
    found = inputs.find_shards(auto)
    forms = {"auto": "pooled", "head": "head", "pooled": "pooled"}  # a classifier
    _written_by(out, "00001", TINY_MODEL, embedding="pooled", embedding_forms=forms)
    _written_by(out, "00002", TINY_MODEL, embedding="head")  # no record: 'auto' cannot be judged against it
    plan.check_outputs_beside(auto, found)
    with pytest.raises(inputs.InputError, match=r"00001.parquet \(embedding pooled\)"):
        plan.check_outputs_beside(auto.model_copy(update={"embedding": "head"}), found)
    _written_by(out, "00003", TINY_MODEL, embedding="head", embedding_forms=forms)
    with pytest.raises(inputs.InputError, match=r"00003.parquet \(embedding head\)") as err:
        plan.check_outputs_beside(auto, found)
    assert "00001" not in str(err.value) and "00002" not in str(err.value)
    headless = {"auto": "pooled", "head": "pooled", "pooled": "pooled"}  # head on a model without one is pooled
    (out / "00003.parquet").unlink()
    (out / "00002.parquet").unlink()
    _written_by(out, "00004", TINY_MODEL, embedding="pooled", embedding_forms=headless)
    plan.check_outputs_beside(auto, found)


SETTINGS = dict(device="cpu", batch_size=4, num_threads_per_worker=1)


def _footer_model(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"wdsembed"])["result"]["model"]


def test_other_checkpoint_weights_are_refused_beside_earlier_outputs(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    import timm
    import torch
    from safetensors.torch import save_file

    from wdsembed.api import TimmImageEmbedder

    data = tmp_path / "in"
    for s in range(2):
        shard(data, f"{s:05d}", n=3, seed=s)
    weights = []
    for seed in (1, 2):  # two different weights files of the same architecture
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.safetensors"
        save_file(timm.create_model(TINY_MODEL, pretrained=False).state_dict(), str(path))
        weights.append(str(path))
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, checkpoint=weights[0], **SETTINGS)(str(data), str(out))
    assert _footer_model(out / "00001.parquet")["checkpoint"] == {"path": weights[0],
                                                                  "fingerprint": output_fingerprint(Path(weights[0]))}
    with pytest.raises(inputs.InputError, match="already holds embeddings made otherwise"):
        # only 00000 is named: 00001 keeps w1's embeddings, 00000 gets w2's, one kNN view holds both spaces
        TimmImageEmbedder(TINY_MODEL, checkpoint=weights[1], **SETTINGS)(str(data / "00000.tar"), str(out))
    monkeypatch.chdir(tmp_path)  # the same file, named relatively: the same weights
    [result] = TimmImageEmbedder(TINY_MODEL, checkpoint="./w1.safetensors", **SETTINGS)(str(data / "00000.tar"),
                                                                                      str(out))
    assert result.embedded == 3  # not refused (recomputed: the checkpoint as given is part of the cache key)


def test_a_checkpoint_rewritten_at_its_path_is_loaded_again_in_the_same_process(tmp_path):
    """In one process (the API; a shared Dask worker likewise) a checkpoint file rewritten at the same path between
    two runs changes the cache key, so the shards are recomputed; the process's Worker must be built again for it,
    not serve the old weights under the new key and the new file's record."""
    pytest.importorskip("nvidia.dali")
    import timm
    import torch
    from safetensors.torch import save_file

    from wdsembed import storage
    from wdsembed.api import TimmImageEmbedder

    shard(tmp_path / "in", "00000", n=3)
    weights = tmp_path / "w.safetensors"
    tables = []
    for seed, out in ((1, "one"), (2, "two")):
        torch.manual_seed(seed)
        save_file(timm.create_model(TINY_MODEL, pretrained=False).state_dict(), str(weights))
        later = time.time() + 5 * seed  # a new mtime, whatever the file system's time resolution
        os.utime(weights, (later, later))
        TimmImageEmbedder(TINY_MODEL, checkpoint=str(weights), **SETTINGS)(str(tmp_path / "in"), str(tmp_path / out))
        tables.append(pq.read_table(tmp_path / out / "00000.parquet"))
        assert _footer_model(tmp_path / out / "00000.parquet")["checkpoint"]["fingerprint"] \
            == storage.checkpoint_identity(str(weights))
    assert tables[0].column("image_embedding") != tables[1].column("image_embedding"), \
        "the second run embedded with the first run's weights"


def test_a_local_dir_model_exported_again_at_its_path_is_embedded_again(tmp_path):
    """A `local-dir:` model is its folder's config.json and weights, as a checkpoint is its file: exported again at
    the same path (retrained), a re-run into the same output embeds with the new weights. The cache key named only the
    folder, so the re-run found every shard finished and kept the old weights' embeddings; in one process its Worker
    would have served the old weights too."""
    pytest.importorskip("nvidia.dali")
    import timm
    import torch
    from timm.models import save_for_hf

    from wdsembed.api import TimmImageEmbedder

    shard(tmp_path / "in", "00000", n=3)
    folder, out = tmp_path / "model", tmp_path / "out"
    tables, cached = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_for_hf(timm.create_model(TINY_MODEL, pretrained=False), str(folder), safe_serialization=True)
        settings = SETTINGS | {"pretrained": True}
        cached += [r.cached for r in TimmImageEmbedder(f"local-dir:{folder}", **settings)(str(tmp_path / "in"),
                                                                                           str(out))]
        tables.append(pq.read_table(out / "00000.parquet"))
    assert cached == [False, False], "the re-run took the old weights' output for finished"
    assert tables[0].column("image_embedding") != tables[1].column("image_embedding"), \
        "the second run embedded with the first run's weights"


def test_pretrained_beside_a_checkpoint_recomputes_nothing(tmp_path):
    """A checkpoint's weights are loaded whatever `pretrained` says, so a re-run that only adds or drops
    --no-pretrained beside the same --checkpoint gives the same embeddings: its shards are finished, not embedded
    again (the key held `pretrained`, and every shard was recomputed for nothing)."""
    pytest.importorskip("nvidia.dali")
    import timm
    import torch
    from safetensors.torch import save_file

    from wdsembed.api import TimmImageEmbedder

    shard(tmp_path / "in", "00000", n=3)
    torch.manual_seed(1)
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(TINY_MODEL, pretrained=False).state_dict(), str(weights))
    out = tmp_path / "out"
    [first] = TimmImageEmbedder(TINY_MODEL, pretrained=True, checkpoint=str(weights), **SETTINGS)(
        str(tmp_path / "in"), str(out))
    assert not first.cached and first.embedded == 3
    [again] = TimmImageEmbedder(TINY_MODEL, pretrained=False, checkpoint=str(weights), **SETTINGS)(
        str(tmp_path / "in"), str(out))
    assert again.cached and again.cache_key == first.cache_key
    # without a checkpoint, pretrained decides the weights: still part of the key
    plain = config(tmp_path / "in", out)
    assert plain.model_key() != plain.model_copy(update={"pretrained": True}).model_key()


def test_a_missing_checkpoint_is_said_missing_not_rewritten(tree, tmp_path):
    """The check of outputs beside a run's own reads this run's checkpoint first: a missing file is named as such,
    not taken for another file that made every output beside."""
    weights = tmp_path / "w.safetensors"
    out = tmp_path / "out"
    _written_by(out, "00001", TINY_MODEL, weights=f"checkpoint:{weights}",
                checkpoint={"path": str(weights), "fingerprint": "7:1.0"})
    one = config(tree / "00000.tar", out, embedding="pooled", checkpoint=str(weights))
    with pytest.raises(inputs.InputError, match=r"checkpoint .*w\.safetensors.* cannot be read: FileNotFoundError"):
        plan.check_outputs_beside(one, inputs.find_shards(one))


def test_other_head_is_refused_beside_earlier_outputs(tmp_path):
    pytest.importorskip("nvidia.dali")
    from wdsembed.api import TimmImageEmbedder

    data = tmp_path / "in"
    for s in range(2):
        shard(data, f"{s:05d}", n=3, seed=s)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, pretrained=False, embedding="head", **SETTINGS)(str(data), str(out))
    try:
        # embedding="auto" resolves to 'pooled' for this classifier: another space (and another dimension)
        TimmImageEmbedder(TINY_MODEL, pretrained=False, **SETTINGS)(str(data / "00000.tar"), str(out))
    except inputs.InputError as exc:
        assert "already holds embeddings made otherwise" in str(exc)
        assert "00001.parquet (embedding head)" in str(exc)
        return
    kinds = {s: (_footer_model(out / f"{s}.parquet")["embedding"], _footer_model(out / f"{s}.parquet")["dim"])
             for s in ("00000", "00001")}
    pytest.fail(f"not refused: OUTPUT now mixes embedding kinds/dims {kinds}")


def test_auto_after_the_explicit_form_it_resolves_to_is_not_refused(tmp_path):
    """Outputs made with embedding='pooled' on a classifier, then a run with 'auto' (pooled there too) naming some
    of the shards: the same space, not refused."""
    pytest.importorskip("nvidia.dali")
    from wdsembed.api import TimmImageEmbedder

    data = tmp_path / "in"
    for s in range(2):
        shard(data, f"{s:05d}", n=3, seed=s)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, pretrained=False, embedding="pooled", **SETTINGS)(str(data), str(out))
    assert _footer_model(out / "00001.parquet")["embedding_forms"] == {"auto": "pooled", "head": "head",
                                                                       "pooled": "pooled"}
    [result] = TimmImageEmbedder(TINY_MODEL, pretrained=False, **SETTINGS)(str(data / "00000.tar"), str(out))
    assert result.embedded == 3


def test_recursive_run_outputs_caching_manifest_and_views_agree(tree, tmp_path):
    """Two 00000.tar in different folders: two outputs, two views, two manifest entries; a second run finds them
    all finished; a deleted view comes back without re-embedding; validation checks each with its view."""
    pytest.importorskip("nvidia.dali")
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.validate import validate_output

    data = tmp_path / "two"
    shard(data / "train", "00000", n=3, seed=1)
    shard(data / "val", "00000", n=2, seed=2)
    out = tmp_path / "out"
    embed = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              recursive=True)
    first = embed(str(data), str(out))
    assert sorted((r.stem, r.embedded, r.cached) for r in first) == [("train/00000", 3, False),
                                                                     ("val/00000", 2, False)]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["train/00000", "val/00000"]
    # OUTPUT read as one dataset gives every shard's full table (the kNN views under _embeddings/ left out)
    import pandas as pd
    import pyarrow.dataset as ds

    assert ds.dataset(str(out), format="parquet").count_rows() == len(pd.read_parquet(out)) == 5
    for r in first:
        assert r.output == str(out / f"{r.stem}.parquet")
        assert pq.read_table(out / output.EMBEDDINGS_FOLDER / f"{r.stem}.parquet").num_rows == r.embedded
        assert validate_output(embed.config(str(data), str(out)), r.output, dim=r.dim, expected_rows=r.rows,
                               expected_embedded=r.embedded).ok
    (out / output.EMBEDDINGS_FOLDER / "val" / "00000.parquet").unlink()
    check = validate_output(embed.config(str(data), str(out)), str(out / "val" / "00000.parquet"), dim=first[0].dim)
    assert check.problems == ["kNN view _embeddings/val/00000.parquet is missing"]
    second = embed(str(data), str(out))
    assert all(r.cached for r in second)
    assert pq.read_table(out / output.EMBEDDINGS_FOLDER / "val" / "00000.parquet").num_rows == 2  # rebuilt


# --------------------------------------------------------------------------------------------------- why recomputed


def _api(**settings):
    from wdsembed.api import TimmImageEmbedder

    return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                             **settings)


def _recompute_lines(caplog, embed, data: Path, out: Path) -> list[str]:
    """The lines a run of `embed` logs on why outputs already there are recomputed (its planning's, before any
    work); the run itself must finish."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wdsembed"):
        embed(str(data), str(out))
    return [r.getMessage() for r in caplog.records if "to recompute:" in r.getMessage()]


def test_a_rerun_with_a_setting_changed_says_which_with_its_old_and_new_value(tmp_path, caplog):
    """A re-run that recomputes outputs already there said only '0 shard(s) with a finished output, 3 to compute':
    on thousands of shards, an intended change could not be told from an accident before the work. Each output's
    footer records the cache key's parts; the planning says, per cause, what differs from this run's."""
    pytest.importorskip("nvidia.dali")
    data, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        shard(data, f"{i:05d}", seed=i)
    assert _recompute_lines(caplog, _api(), data, out) == []  # nothing there yet: to compute, not to recompute
    # on the CPU autocast changes no value, so it recomputes nothing (plan.run_precision)
    assert _recompute_lines(caplog, _api(autocast=False), data, out) == []
    assert _recompute_lines(caplog, _api(autocast=False, embedding_dtype="float16"), data, out) == [
        "3 shard(s) to recompute: their outputs were made with embedding_dtype=float32 (now float16): 00000, 00001, "
        "00002"]
    assert _recompute_lines(caplog, _api(autocast=False, embedding_dtype="float16", max_image_pixels=10_000,
                                         normalize_embeddings=False), data, out) == [
        "3 shard(s) to recompute: their outputs were made with normalize_embeddings=True (now False), "
        "max_image_pixels=178956970 (now 10000): 00000, 00001, 00002"]
    assert _recompute_lines(caplog, _api(autocast=False, embedding_dtype="float16", max_image_pixels=10_000,
                                         normalize_embeddings=False), data, out) == []  # all finished


def test_a_rerun_says_which_tars_changed_since_their_outputs(tmp_path, caplog):
    """A rewritten tar (another size) and a touched one (its mtime alone) are two causes, each with its shards."""
    pytest.importorskip("nvidia.dali")
    data, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        shard(data, f"{i:05d}", seed=i)
    _recompute_lines(caplog, _api(), data, out)
    shard(data, "00001", n=3, seed=9)  # rewritten, its parquet too: 3 images now
    for stem in ("00002", "00003"):
        os.utime(data / f"{stem}.tar", (time.time() + 60, time.time() + 60))  # touched
    assert _recompute_lines(caplog, _api(), data, out) == [
        "2 shard(s) to recompute: their tars changed since (mtime): 00002, 00003",
        "1 shard(s) to recompute: their tars changed since (size/mtime); their img2dataset parquets changed since "
        "(size/mtime): 00001"]


def test_outputs_of_an_earlier_version_without_the_record_say_so_and_stay_finished_where_nothing_changed(
        tmp_path, caplog):
    """An output written before footers recorded the cache key's parts: where its key is this run's it is finished
    as before (the record changed no key); where not, the line says what it can: an earlier version made it."""
    pytest.importorskip("nvidia.dali")
    data, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        shard(data, f"{i:05d}", seed=i)
    [first, _] = _api()(str(data), str(out))
    fs = fsspec.filesystem("file")
    for stem in ("00000", "00001"):  # each footer as an earlier version wrote it
        path = out / f"{stem}.parquet"
        meta = output.read_output_metadata(str(path), fs)
        assert meta["cache_key_parts"]["model"]["autocast"] is True
        table = pq.read_table(path)
        table = table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items()
                                               if k != output.FOOTER_KEY})
        output.write_parquet_atomic(table, str(path), fs, {k: v for k, v in meta.items() if k != "cache_key_parts"})
    again = _api()(str(data), str(out))
    assert all(r.cached for r in again) and again[0].cache_key == first.cache_key
    assert _recompute_lines(caplog, _api(normalize_embeddings=False), data, out) == [
        "2 shard(s) to recompute: their outputs were made by an earlier wdsembed version, which did not record its "
        "settings: 00000, 00001"]


def _as_an_earlier_version_wrote_it(path: Path) -> None:
    """An output's footer as versions before the cache key's parts and the resolved timm name wrote it."""
    fs = fsspec.filesystem("file")
    meta = output.read_output_metadata(str(path), fs)
    meta["result"]["model"].pop("timm_name")
    meta["result"]["model"].pop("spellings")
    table = pq.read_table(path)
    table = table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items() if k != output.FOOTER_KEY})
    output.write_parquet_atomic(table, str(path), fs, {k: v for k, v in meta.items() if k != "cache_key_parts"})


def _nothing_to_compute_elsewhere(config: EmbedConfig) -> tuple[bool, list[str]]:
    """plan.nothing_to_compute's answer in a process of its own, and which of torch and timm it imported."""
    import subprocess
    import sys

    code = ("import sys; from wdsembed import plan; from wdsembed.config import EmbedConfig; "
            f"answer = plan.nothing_to_compute(EmbedConfig.model_validate_json({config.model_dump_json()!r})); "
            "print(answer, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent)
    answer, imported = done.stdout.strip().split(" ", 1)
    return answer == "True", json.loads(imported.replace("'", '"'))


def test_a_model_named_with_or_without_its_default_tag_is_one_model_for_resume(tmp_path, caplog):
    """`resnet18` and `resnet18.a1_in1k` (timm's default tag for resnet18) build the same model, yet a run with one
    after a finished run with the other embedded every shard again. Each output keeps the key of the name as typed,
    and a run takes one made under the other spelling, all else equal, for finished: also one written by an earlier
    version (no recorded parts nor resolved name), and whichever spelling comes first. Another tag is another model."""
    pytest.importorskip("nvidia.dali")
    import shutil

    from wdsembed.api import TimmImageEmbedder

    data, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        shard(data, f"{i:05d}", seed=i)

    def embed(name: str, where: Path = out):
        return TimmImageEmbedder(name, pretrained=False, **SETTINGS)(str(data), str(where))

    first = embed("resnet18")
    assert not any(r.cached for r in first)
    # a re-run spelling it otherwise, with nothing to compute, loads no model: timm is not imported to tell so (the
    # footer records the spellings)
    spelled = TimmImageEmbedder("resnet18.a1_in1k", pretrained=False, **SETTINGS).config(str(data), str(out))
    assert _nothing_to_compute_elsewhere(spelled) == (True, [])
    assert {k: _footer_model(out / "00000.parquet")[k] for k in ("name", "timm_name")} == {
        "name": "resnet18", "timm_name": "resnet18.a1_in1k"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wdsembed"):
        spelled_out = embed("resnet18.a1_in1k")
    assert all(r.cached for r in spelled_out) and [r.cache_key for r in spelled_out] == [r.cache_key for r in first]
    assert not [r for r in caplog.records if "to recompute:" in r.getMessage()]
    # a run naming one shard beside the other's output, made under the other spelling: the same space, not refused
    [one] = TimmImageEmbedder("resnet18.a1_in1k", pretrained=False, **SETTINGS)(str(data / "00000.tar"), str(out))
    assert one.cached

    shutil.copytree(out, tmp_path / "copy")
    other_tag = embed("resnet18.tv_in1k", tmp_path / "copy")  # torchvision's weights and crop: another model
    assert not any(r.cached for r in other_tag)
    assert _footer_model(tmp_path / "copy" / "00000.parquet")["timm_name"] == "resnet18.tv_in1k"

    for stem in ("00000", "00001"):
        _as_an_earlier_version_wrote_it(out / f"{stem}.parquet")
    assert all(r.cached for r in embed("resnet18.a1_in1k")) and all(r.cached for r in embed("resnet18"))
    # and the other way round: outputs made with the tag spelled out, found by a run of the bare name
    fresh = tmp_path / "fresh"
    assert not any(r.cached for r in embed("resnet18.a1_in1k", fresh))
    bare = TimmImageEmbedder("resnet18", pretrained=False, **SETTINGS).config(str(data), str(fresh))
    assert _nothing_to_compute_elsewhere(bare) == (True, [])
    assert all(r.cached for r in embed("resnet18", fresh))


def _manifest(out: Path) -> dict:
    return json.loads((out / output.MANIFEST_NAME).read_text())


def test_the_manifest_names_the_model_as_this_run_spells_it_and_each_output_made_otherwise(tmp_path):
    """A run of `resnet18.a1_in1k` that found every output made under `resnet18` wrote a manifest whose model was
    `resnet18` (the first shard's footer), and the summaries said so. The manifest names the model as the run's
    config does; an entry whose output was made under the other spelling says which (`model_name`, with the cache
    key of that spelling), also one kept from an earlier run's manifest or read from a footer, and no entry made
    under this run's spelling does. The outputs themselves are left as they were made. A copy of OUTPUT, whose
    outputs are finished there too, lists them where they are now, not where their footers say they were made."""
    pytest.importorskip("nvidia.dali")
    import shutil

    from wdsembed.api import TimmImageEmbedder
    from wdsembed.report import EARLIER_RUN, describe_model

    data, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        shard(data, f"{i:05d}", seed=i)

    def embed(name: str, *tars: str, where: Path = out):
        given = str(data / tars[0]) if len(tars) == 1 else str(data)
        return TimmImageEmbedder(name, pretrained=False, **SETTINGS)(given, str(where))

    def spelled(manifest: dict) -> dict:
        return {stem: (s["status"], s.get("model_name")) for stem, s in manifest["shards"].items()}

    embed("resnet18", "00000.tar")
    made = (out / "00000.parquet").read_bytes()
    assert not embed("resnet18.a1_in1k", "00001.tar")[0].cached  # beside 00000, which it does not name
    manifest = _manifest(out)
    assert manifest["model"]["name"] == "resnet18.a1_in1k"
    assert spelled(manifest) == {"00000": (EARLIER_RUN, "resnet18"), "00001": ("computed", None)}

    results = embed("resnet18.a1_in1k")  # 00000 and 00001 finished, 00002 computed
    assert [r.cached for r in results] == [True, True, False]
    manifest = _manifest(out)
    assert manifest["model"]["name"] == "resnet18.a1_in1k" == manifest["config"]["model_name"]
    assert spelled(manifest) == {"00000": ("cached", "resnet18"), "00001": ("cached", None),
                                 "00002": ("computed", None)}
    assert manifest["shards"]["00000"]["cache_key"] == results[0].cache_key != results[1].cache_key

    cached = embed("resnet18.a1_in1k")  # every output finished: the manifest's model was the first footer's
    assert all(r.cached for r in cached)
    manifest = _manifest(out)
    assert manifest["model"]["name"] == "resnet18.a1_in1k"
    assert manifest["model"]["timm_name"] == "resnet18.a1_in1k"
    assert manifest["model"]["spellings"][0] == "resnet18.a1_in1k"
    assert describe_model(manifest).startswith("resnet18.a1_in1k (")
    assert spelled(manifest) == {"00000": ("cached", "resnet18"), "00001": ("cached", None),
                                 "00002": ("cached", None)}
    assert (out / "00000.parquet").read_bytes() == made  # its footer still says resnet18
    assert _footer_model(out / "00000.parquet")["name"] == "resnet18"

    # the other spelling again, naming one shard: the others' entries, kept from that manifest, say theirs
    assert embed("resnet18", "00001.tar")[0].cached
    manifest = _manifest(out)
    assert manifest["model"]["name"] == "resnet18"
    assert spelled(manifest) == {"00000": (EARLIER_RUN, None), "00001": ("cached", "resnet18.a1_in1k"),
                                 "00002": (EARLIER_RUN, "resnet18.a1_in1k")}
    # without a manifest, the entries of the shards not named come from their footers
    (out / output.MANIFEST_NAME).unlink()
    assert embed("resnet18.a1_in1k", "00002.tar")[0].cached
    assert spelled(_manifest(out)) == {"00000": (EARLIER_RUN, "resnet18"), "00001": (EARLIER_RUN, None),
                                       "00002": ("cached", None)}

    # a copy of OUTPUT, its manifest included: the entries, kept or found finished, name the outputs in the copy
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert embed("resnet18.a1_in1k", "00002.tar", where=copy)[0].cached
    manifest = _manifest(copy)
    assert manifest["output"] == str(copy)
    assert spelled(manifest) == spelled(_manifest(out))
    assert {s["output"] for s in manifest["shards"].values()} == {str(copy / f"{i:05d}.parquet") for i in range(3)}


def test_a_bare_model_name_beside_its_default_tags_outputs_is_not_another_model(tree, tmp_path):
    """Outputs of shards a run does not name, made by `test_resnet` (its default tag r160_in1k): a run of
    `test_resnet.r160_in1k` beside them is of the same model, not refused as another's; another architecture is."""
    out = tmp_path / "out"
    _written_by(out, "00001", "test_resnet")
    one = config(tree / "00000.tar", out, embedding="pooled")
    plan.check_config(one)
    plan.check_config(one.model_copy(update={"model_name": "test_resnet"}))
    _written_by(out, "00002", "test_resnet.r160_in1k")
    plan.check_config(one.model_copy(update={"model_name": "test_resnet"}))
    _written_by(out, "00003", "test_convnext")
    with pytest.raises(inputs.InputError, match=r"00003.parquet \(model test_convnext\)"):
        plan.check_config(one)


def test_a_rerun_naming_some_shards_keeps_the_others_finished_outputs_in_the_manifest(tree, tmp_path):
    """A run over 00000..00003, then one naming 00000..00001 into the same OUTPUT: its manifest listed those two only,
    though OUTPUT held four finished outputs of the same model. It keeps the earlier manifest's entries of the
    shards it does not name whose outputs are still there, marked as an earlier run's (which one); its totals say
    what it did and what OUTPUT holds. An entry carried on keeps the run that wrote it; a deleted output loses it."""
    pytest.importorskip("nvidia.dali")
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.report import EARLIER_RUN, markdown_summary, shard_rows

    out = tmp_path / "out"
    embed = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)
    embed(f"{tree}/{{00000..00003}}.tar", str(out))
    first = json.loads((out / "_manifest.json").read_text())

    again = embed(f"{tree}/{{00000..00001}}.tar", str(out))
    assert all(r.cached for r in again)
    second = json.loads((out / "_manifest.json").read_text())
    assert sorted(second["shards"]) == ["00000", "00001", "00002", "00003"]
    earlier = {"created": first["created"], "input": first["input"]}
    for stem in ("00002", "00003"):
        assert second["shards"][stem] == first["shards"][stem] | {"status": EARLIER_RUN, "from_run": earlier}
    assert [second["shards"][s]["status"] for s in ("00000", "00001")] == ["cached", "cached"]
    t = second["totals"]
    assert (t["shards"], t["cached"], t["rows"], t["embedded_this_run"]) == (2, 2, 4, 0)  # this run's
    assert t["in_output"] == {"shards": 4, EARLIER_RUN: 2, "rows": 8, "embedded": 8, "embedded_rows": 8,
                              "failed_rows": 0}
    text = markdown_summary(second, shard_rows([], {}))
    assert "output holds 4 finished shard(s), 8 of 8 rows embedded: 2 of them from earlier runs" in text

    (out / "00003.parquet").unlink()
    embed(f"{tree}/00001.tar", str(out), force=True)
    third = json.loads((out / "_manifest.json").read_text())
    assert sorted(third["shards"]) == ["00000", "00001", "00002"]  # 00003's output is gone: no entry for it
    assert third["shards"]["00001"]["status"] == "computed"
    assert third["shards"]["00002"]["from_run"] == earlier  # the run that wrote it, not the one that carried it
    assert third["shards"]["00000"]["from_run"] == {"created": second["created"], "input": second["input"]}
    assert (third["totals"]["shards"], third["totals"]["in_output"]["shards"]) == (1, 3)


def test_a_manifest_after_a_run_that_left_none_still_describes_every_output(tree, tmp_path):
    """A growing dataset: a shard dropped from INPUT keeps its output, an earlier run's entry in the manifest. A run
    that writes removes the manifest first, so one killed before its end leaves none; the next run's manifest then
    left that output out for good (its entry came from the manifest alone), though OUTPUT and its kNN view still
    held it: the totals said 2 shards where OUTPUT held 3. An output no manifest describes gets its entry from its
    own footer."""
    pytest.importorskip("nvidia.dali")
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.report import EARLIER_RUN

    out = tmp_path / "out"
    embed = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)
    [_, _, dropped] = embed(f"{tree}/{{00000..00002}}.tar", str(out))
    embed(f"{tree}/{{00000..00001}}.tar", str(out))  # 00002 dropped from the dataset: an earlier run's entry
    assert json.loads((out / "_manifest.json").read_text())["shards"]["00002"]["status"] == EARLIER_RUN

    (out / "_manifest.json").unlink()  # what a run killed after its first write leaves
    embed(f"{tree}/{{00000..00001}}.tar", str(out))
    manifest = json.loads((out / "_manifest.json").read_text())
    entry = manifest["shards"]["00002"]
    assert entry["status"] == EARLIER_RUN and entry["from_run"] is None  # no manifest said which run wrote it
    assert {k: entry[k] for k in ("rows", "embedded", "failed", "cache_key")} == {
        "rows": dropped.rows, "embedded": dropped.embedded, "failed": dropped.failed, "cache_key": dropped.cache_key}
    held = manifest["totals"]["in_output"]
    assert (held["shards"], held[EARLIER_RUN]) == (3, 1)
    assert held["embedded_rows"] == pq.read_table(out / output.EMBEDDINGS_FOLDER).num_rows
    embed(f"{tree}/{{00000..00001}}.tar", str(out))  # carried on as it was
    assert json.loads((out / "_manifest.json").read_text())["shards"]["00002"] == entry
