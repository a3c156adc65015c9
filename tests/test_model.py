"""wdsembed.model against real timm models (random weights; no Hub access needed or made)."""
from __future__ import annotations

import logging
import os
import re
import shutil
import time

import pytest
import torch
from torch import nn

from wdsembed.model import (
    LoadedModel,
    ModelLoadError,
    embed_batch,
    load_model,
    resolve_embedding,
)

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _empty_offline_hub(tmp_path, monkeypatch):
    """Every test: an empty Hugging Face cache, offline, so nothing here can reach (or wait on) the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def _batch(loaded: LoadedModel, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *loaded.data_config["input_size"]), generator=g)


def _seeded_model(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _loads_from_checkpoint(tmp_path, name: str, source: nn.Module, file: str, expected, **kw) -> LoadedModel:
    """`source`'s weights saved to `file` and loaded by name: its embeddings must be `expected(source, x)`."""
    path = tmp_path / file
    torch.save(source.state_dict(), path)
    loaded = load_model(name, checkpoint=str(path), **kw)
    x = _batch(loaded)
    with torch.inference_mode():
        want = expected(source, x)
    torch.testing.assert_close(embed_batch(loaded, x, autocast=False, normalize=False), want)
    return loaded


def _same_weights(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether two loaded models hold the same entries with equal values."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _pooled(source: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return source.forward_head(source.forward_features(x), pre_logits=True)


@pytest.fixture(scope="module")
def clip_b16() -> LoadedModel:
    return load_model("vit_base_patch16_clip_224.openai", pretrained=False)


@pytest.fixture(scope="module")
def resnet18() -> LoadedModel:
    return load_model("resnet18", pretrained=False)


# --------------------------------------------------------------------------------------------------- embedding


def test_auto_takes_the_clip_projection(clip_b16):
    assert clip_b16.embedding == "head"
    assert clip_b16.dim == 512
    assert clip_b16.weights == "random-init"
    out = embed_batch(clip_b16, _batch(clip_b16), autocast=False, normalize=False)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    # it is the head output (the projection), not the 768-d pooled features
    with torch.inference_mode():
        expected = clip_b16.model(_batch(clip_b16))
    torch.testing.assert_close(out, expected)


def test_auto_takes_pooled_features_of_classifiers(resnet18):
    assert resnet18.embedding == "pooled"
    assert resnet18.dim == 512  # not the 1000 class logits
    x = _batch(resnet18)
    out = embed_batch(resnet18, x, autocast=False, normalize=False)
    assert out.shape == (2, 512)
    with torch.inference_mode():
        expected = resnet18.model.forward_head(resnet18.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(out, expected)


def test_vit_tiny_pooled_dim_matches_output():
    loaded = load_model("vit_tiny_patch16_224", pretrained=False)
    assert (loaded.embedding, loaded.dim) == ("pooled", 192)
    assert embed_batch(loaded, _batch(loaded), autocast=True, normalize=True).shape == (2, 192)


def test_explicit_pooled_on_clip(clip_b16):
    loaded = LoadedModel(**{**clip_b16.__dict__, "embedding": "pooled"})
    assert embed_batch(loaded, _batch(loaded), autocast=False, normalize=False).shape == (2, 768)


def test_normalize(resnet18):
    x = _batch(resnet18)
    raw = embed_batch(resnet18, x, autocast=False, normalize=False)
    unit = embed_batch(resnet18, x, autocast=False, normalize=True)
    norms = unit.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(2), atol=1e-5, rtol=0)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2), atol=1e-2)
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True))


def test_a_huge_but_finite_embedding_is_normalized_not_called_all_zeros():
    """A model whose embedding values are huge but finite (about 1e25 here: a checkpoint's scaled norm layer): its
    L2 norm overflowed float32 to infinity, normalizing divided every value by it, and the row came out all zeros,
    which the run then refused as 'embedding is all zeros', the wrong cause. Such a row is now normalized to its
    unit vector; any other row is normalized bit for bit as before."""
    from wdsembed.validate import unusable_rows

    loaded = load_model("resnet18", pretrained=False)
    x = _batch(loaded)
    ordinary = embed_batch(loaded, x, autocast=False, normalize=False)
    assert torch.equal(embed_batch(loaded, x, autocast=False, normalize=True),
                       torch.nn.functional.normalize(ordinary, p=2.0, dim=1, eps=1e-12))
    with torch.no_grad():
        loaded.model.layer4[1].bn2.weight.fill_(1e25)  # timm starts it at zero (zero_init_last)
    raw = embed_batch(loaded, x, autocast=False, normalize=False)
    assert torch.isfinite(raw).all() and torch.isinf(torch.linalg.vector_norm(raw, dim=1)).all()
    unit = embed_batch(loaded, x, autocast=False, normalize=True)
    want = raw.double() / torch.linalg.vector_norm(raw.double(), dim=1, keepdim=True)
    torch.testing.assert_close(unit.double(), want, rtol=1e-5, atol=1e-7)
    assert unusable_rows(unit.numpy(), normalized=True) == {}


def test_autocast_is_ignored_on_cpu(resnet18):
    x = _batch(resnet18)
    a = embed_batch(resnet18, x, autocast=True, normalize=False)
    b = embed_batch(resnet18, x, autocast=False, normalize=False)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


def test_a_convnet_runs_channels_last_on_the_cpu_with_the_same_embeddings(resnet18):
    """oneDNN's convolutions run faster on channels_last batches on the CPU too (docs/benchmarks.md); the values
    are those of the model as timm builds it, within float32 rounding. A ViT (one conv) keeps its layout."""
    assert resnet18.device.type == "cpu" and resnet18.channels_last
    x = _batch(resnet18, n=4)
    with torch.inference_mode():
        plain = _pooled(resnet18.model.to(memory_format=torch.contiguous_format), x)
    resnet18.model.to(memory_format=torch.channels_last)
    ours = embed_batch(resnet18, x, autocast=False, normalize=False)
    assert torch.nn.functional.cosine_similarity(ours, plain).min() > 0.99999
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    assert not load_model("test_vit.r160_in1k", pretrained=False, device="cpu").channels_last


class _FakeModel(nn.Module):
    def __init__(self, arch: str, tag: str, num_classes: int):
        super().__init__()
        self.pretrained_cfg = {"architecture": arch, "tag": tag}
        self.num_classes = num_classes
        self.head = nn.Linear(4, num_classes) if num_classes else nn.Identity()

    def get_classifier(self):
        return self.head


@pytest.mark.parametrize(
    "arch,tag,num_classes,expected",
    [
        ("vit_large_patch14_clip_quickgelu_224", "openai", 768, "head"),
        ("vit_large_patch14_clip_224", "openai_ft_in12k_in1k", 1000, "pooled"),
        ("vit_base_patch16_clip_224", "laion2b_ft_in12k", 11821, "pooled"),
        ("vit_huge_patch14_clip_224", "dfn5b", 1024, "head"),
        ("vit_base_patch16_clip_224", "metaclip_2pt5b", 512, "head"),
        ("vit_base_patch32_clip_256", "datacompxl", 512, "head"),
        ("convnext_base", "clip_laion2b", 640, "head"),
        ("convnext_large_mlp", "clip_laion2b_ft_320", 768, "head"),  # a CLIP fine-tune at 320 px, still CLIP
        ("convnext_base", "clip_laion2b_augreg_ft_in1k", 1000, "pooled"),
        ("eva02_base_patch16_clip_224", "merged2b", 512, "head"),
        ("fastvit_mci0", "apple_mclip", 512, "head"),
        ("vit_pe_core_base_patch16_224", "fb", 1024, "head"),
        ("resnet50_clip", "openai", 1024, "head"),
        ("vit_so400m_patch14_siglip_384", "webli", 0, "pooled"),  # no head: pooled is the SigLIP embedding
        ("vit_so400m_patch14_siglip_378", "webli_ft_in1k", 1000, "pooled"),
        ("vit_base_patch16_224", "bamboo", 115217, "pooled"),
        ("vit_betwixt_patch16_rope_reg4_gap_256", "sbb_in1k", 1000, "pooled"),
        ("resnet50", "a1_in1k", 1000, "pooled"),
        ("resnet50", "fb_ssl_yfcc100m_ft_in1k", 1000, "pooled"),
        ("vit_large_patch14_dinov2", "lvd142m", 0, "pooled"),
    ],
)
def test_auto_rule(arch, tag, num_classes, expected):
    assert resolve_embedding(_FakeModel(arch, tag, num_classes), "auto") == expected


def test_head_request():
    # no head: head == pooled, reported as pooled
    assert resolve_embedding(_FakeModel("vit_base_patch16_siglip_224", "webli", 0), "head") == "pooled"
    # a classifier's head is honoured when asked for explicitly
    assert resolve_embedding(_FakeModel("resnet50", "a1_in1k", 1000), "head") == "head"
    assert resolve_embedding(_FakeModel("vit_base_patch16_clip_224", "openai", 512), "pooled") == "pooled"
    with pytest.raises(ModelLoadError):
        load_model("resnet18", pretrained=False, embedding="logits")


# --------------------------------------------------------------------------------------------------- weights


def test_random_init_is_the_same_in_every_load(resnet18):
    again = load_model("resnet18", pretrained=False)
    x = _batch(resnet18)
    assert torch.equal(
        embed_batch(resnet18, x, autocast=False, normalize=False), embed_batch(again, x, autocast=False, normalize=False)
    )
    assert _same_weights(again, resnet18)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "training-checkpoint"])
def test_checkpoint_loads_those_weights(tmp_path, resnet18, fmt):
    source = _seeded_model("resnet18", seed=1234)
    sd = source.state_dict()
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth":
        torch.save(sd, path)
    else:
        torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)

    loaded = load_model("resnet18", pretrained=False, checkpoint=str(path))
    assert loaded.weights == f"checkpoint:{path}"
    x = _batch(loaded)
    out = embed_batch(loaded, x, autocast=False, normalize=False)
    with torch.inference_mode():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
    torch.testing.assert_close(out, expected)
    # and they are really other weights than the random init
    assert not torch.allclose(out, embed_batch(resnet18, x, autocast=False, normalize=False))
    assert not _same_weights(loaded, resnet18)


def test_checkpoint_of_a_clip_tower_keeps_its_projection(tmp_path, clip_b16):
    source = _seeded_model("vit_base_patch16_clip_224.openai", seed=7)
    loaded = _loads_from_checkpoint(tmp_path, "vit_base_patch16_clip_224.openai", source, "clip.pth",
                                    lambda m, x: m(x))
    assert (loaded.embedding, loaded.dim) == ("head", 512)


def test_finetuned_classifier_checkpoint_with_other_classes(tmp_path):
    source = _seeded_model("resnet18", seed=5, num_classes=10)
    loaded = _loads_from_checkpoint(tmp_path, "resnet18", source, "ft10.pth", _pooled)
    assert (loaded.embedding, loaded.dim) == ("pooled", 512)


def test_clip_checkpoint_finetuned_on_its_own_classes_gives_pooled_features_not_class_logits(tmp_path, caplog):
    # the tag still names CLIP pretraining, but the checkpoint's 10-class head is a classifier now
    name = "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
    source = _seeded_model(name, seed=3, num_classes=10)
    loaded = _loads_from_checkpoint(tmp_path, name, source, "clip_ft10.pth", _pooled)
    assert (loaded.embedding, loaded.dim) == ("pooled", source.num_features)
    path = tmp_path / "clip_ft10.pth"
    # asked for by name, the head is given, as on any classifier, with the warning that it is class logits
    with caplog.at_level(logging.WARNING, logger="wdsembed.model"):
        logits = load_model(name, checkpoint=str(path), embedding="head")
    assert (logits.embedding, logits.dim) == ("head", 10)
    assert "class logits" in caplog.text


def test_checkpoint_saved_without_a_head_gives_the_pooled_features(tmp_path):
    # a feature extractor's weights (num_classes=0, as self-supervised training leaves them): loaded without the head
    source = _seeded_model("resnet18.a1_in1k", seed=5, num_classes=0)
    loaded = _loads_from_checkpoint(tmp_path, "resnet18.a1_in1k", source, "features.pth", lambda m, x: m(x))
    assert (loaded.embedding, loaded.dim) == ("pooled", 512)
    path = tmp_path / "features.pth"
    # the head it does not have is refused, not replaced by a random one or silently by the pooled features
    with pytest.raises(ModelLoadError, match=r"features.pth.*has no head.*--embedding \(embedding=\) pooled"):
        load_model("resnet18.a1_in1k", checkpoint=str(path), embedding="head")
    # the embedding refused is named as its reader asked for it: the command's user typed no embedding='head'
    from wdsembed.config import speaking_to

    for audience, asked, fix in ((None, "--embedding head (embedding='head')", "--embedding (embedding=) pooled"),
                                 ("command", "--embedding head", "--embedding pooled"),
                                 ("api", "embedding='head'", "embedding= pooled")):
        with speaking_to(audience), pytest.raises(ModelLoadError) as refusal:
            load_model("resnet18.a1_in1k", checkpoint=str(path), embedding="head")
        assert f"so {asked} cannot be had. Pass {fix} or auto" in str(refusal.value), (audience, refusal.value)


def _sourced_name(tmp_path, source: str, name: str) -> str:
    """`name` as a local-dir: folder or an hf-hub: repo in the (offline) Hugging Face cache: its config.json,
    written by timm."""
    from timm.models import save_for_hf

    if source == "local-dir":
        save_for_hf(timm.create_model(name, pretrained=False), tmp_path / "exported", safe_serialization=True)
        return f"local-dir:{tmp_path / 'exported'}"
    folder = tmp_path / "hf" / "hub" / f"models--timm--{name}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    save_for_hf(timm.create_model(name, pretrained=False), folder / "snapshots" / commit, safe_serialization=True)
    return f"hf-hub:timm/{name}"


@pytest.mark.parametrize("source", ["local-dir", "hf-hub"])
def test_an_hf_hub_or_local_dir_model_takes_a_fine_tuned_or_headless_checkpoint_as_its_name_does(tmp_path, source):
    """Its checkpoint is judged against the head its config.json gives, as a timm name's is against its own cfg:
    a fine-tune's classes of its own, or no head at all, give the pooled features. Before, both were refused as
    weights that do not fit."""
    name = _sourced_name(tmp_path, source, "resnet18.a1_in1k")
    ft = _loads_from_checkpoint(tmp_path, name, _seeded_model("resnet18", seed=5, num_classes=10), "ft10.pth", _pooled)
    assert (ft.embedding, ft.dim) == ("pooled", 512)
    features = _loads_from_checkpoint(tmp_path, name, _seeded_model("resnet18", seed=6, num_classes=0),
                                      "features.pth", lambda m, x: m(x))
    assert (features.embedding, features.dim) == ("pooled", 512)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_a_model_without_pooling_is_refused_offering_only_what_could_work(tmp_path, num_classes):
    """A model whose output is not (N, dim) (its config turns pooling off) was refused with 'choose the other
    embedding or a model with a pooling head', whatever was asked: with no head, 'head' had already fallen back to
    the pooled features that failed, and a head over unpooled features fails too. Neither is offered now."""
    import json

    import timm
    from timm.models import save_for_hf

    from wdsembed.config import speaking_to

    folder = tmp_path / "unpooled"
    save_for_hf(timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=num_classes,
                                  global_pool=""), str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(num_classes=num_classes, model_args={"global_pool": ""})
    (folder / "config.json").write_text(json.dumps(config))
    for embedding in ("auto", "head", "pooled"):
        with speaking_to("command"), pytest.raises(ModelLoadError) as refusal:
            load_model(f"local-dir:{folder}", pretrained=False, embedding=embedding)
        said = str(refusal.value)
        assert "other embedding" not in said and "--embedding" not in said, (embedding, said)
        assert said.endswith("Pass --model a model with a pooling head"), (embedding, said)


def test_the_other_embedding_is_offered_where_it_gives_one():
    # what a refusal of one embedding offers (model._what_could_work): the other, where the model gives (N, dim) by it
    from wdsembed.config import speaking_to
    from wdsembed.model import _what_could_work

    loaded = load_model("test_resnet.r160_in1k", pretrained=False, embedding="pooled")  # a 1000-class head
    with speaking_to("api"):
        assert _what_could_work(loaded, _batch(loaded)) == (
            "embedding='head', which gives (N, 1000), or model_name= a model with a pooling head")


def _openai_clip_layout(state_dict: dict) -> dict:
    """A timm CLIP ViT's weights as OpenAI's CLIP names them: the inverse of timm's _convert_openai_clip."""
    out = {}
    for k, v in state_dict.items():
        if k == "head.bias":  # OpenAI's projection has none
            continue
        special = {"head.weight": ("proj", lambda t: t.t()), "cls_token": ("class_embedding", lambda t: t[0, 0]),
                   "pos_embed": ("positional_embedding", lambda t: t[0])}
        if k in special:
            k, v = special[k][0], special[k][1](v).contiguous()
        else:
            k = re.sub(r"^norm\.", "ln_post.", k)
            for timm_name, openai_name in [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"),
                                           ("blocks.", "transformer.resblocks."), (".norm", ".ln_"),
                                           ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
                                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                k = k.replace(timm_name, openai_name)
        out[f"visual.{k}"] = v
    return out


def test_clip_checkpoint_in_openai_layout_keeps_its_projection(tmp_path):
    # it has none of timm's head keys either (timm's conversion makes them): it must not be taken for a headless one
    name = "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
    source = _seeded_model(name, seed=11)
    path = tmp_path / "openai_clip.pth"
    torch.save(_openai_clip_layout(source.state_dict()), path)
    loaded = load_model(name, checkpoint=str(path))
    assert (loaded.embedding, loaded.dim) == ("head", source.num_classes)
    x = _batch(loaded)
    with torch.inference_mode():
        expected = source(x)
    torch.testing.assert_close(embed_batch(loaded, x, autocast=False, normalize=False), expected)


def test_checkpoint_missing(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        load_model("resnet18", checkpoint=str(missing))


def test_checkpoint_that_does_not_fit(tmp_path):
    """One line naming the file and the model, what the load found counted with a few names of each, and what to
    pass: torch's own message lists every key, on several lines (850 characters cut short, for a tiny ViT)."""
    path = tmp_path / "vit_tiny.pth"
    torch.save(_seeded_model("vit_tiny_patch16_224", seed=0).state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model("resnet18", checkpoint=str(path))
    advice = ("Pass --checkpoint (checkpoint=) a weights file of 'resnet18', or --model (model_name=) the model the "
              "file was trained as")
    assert str(info.value) == (
        f"checkpoint '{path}' does not fit 'resnet18': 102 of the model's weights missing (conv1.weight, bn1.weight, "
        "bn1.bias, ...); 152 in the file that the model has no place for (cls_token, pos_embed, "
        f"patch_embed.proj.weight, ...). {advice}"), str(info.value)
    # the same architecture, one weight of another shape
    weights = _seeded_model("resnet18", seed=0).state_dict()
    weights["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(weights, path)
    with pytest.raises(ModelLoadError) as info:
        load_model("resnet18", checkpoint=str(path))
    assert str(info.value) == (f"checkpoint '{path}' does not fit 'resnet18': 1 of another shape "
                               f"(layer1.0.conv1.weight [3, 3, 3, 3] for [64, 64, 3, 3]). {advice}"), str(info.value)


def test_a_name_and_its_default_tag_build_one_model_and_other_spellings_stay_apart():
    """Resume takes `resnet18` and `resnet18.a1_in1k` (timm's default tag for it) for one model
    (shard.made_as_spelled_otherwise): timm builds them alike, seeded random weights and preprocessing included.
    Another tag is another model (torchvision's crop); hf-hub: and local-dir: names have their own config.json, and
    are never merged with a registry name."""
    from wdsembed.model import spellings, timm_name

    bare, tagged = (load_model(n, pretrained=False) for n in ("resnet18", "resnet18.a1_in1k"))
    assert bare.data_config == tagged.data_config
    assert all(torch.equal(a, b) for a, b in zip(bare.model.state_dict().values(),
                                                 tagged.model.state_dict().values()))
    assert load_model("resnet18.tv_in1k", pretrained=False, device="meta").data_config != bare.data_config
    assert timm_name("resnet18") == "resnet18.a1_in1k" == timm_name("resnet18.a1_in1k")
    assert spellings("resnet18") == ("resnet18", "resnet18.a1_in1k")
    assert spellings("resnet18.a1_in1k") == ("resnet18.a1_in1k", "resnet18")
    for alone in ("resnet18.tv_in1k", "hf-hub:timm/resnet18.a1_in1k", "local-dir:/models/resnet18", "no_such_model"):
        assert spellings(alone) == (alone,)


def test_checkpoint_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"definitely not a pickle" * 10)
    with pytest.raises(ModelLoadError, match="garbage.bin"):
        load_model("resnet18", checkpoint=str(path))


def test_a_vit_checkpoint_of_another_input_size_is_warned_of_once_per_run_before_any_work(tmp_path, caplog):
    """A ViT fine-tuned at 384 px (a 24x24 patch grid of position embeddings) loaded as a 224 px model (14x14): timm
    resamples the embeddings and the run embedded at 224 px without a word. The pre-flight model check now warns, once
    per run (a process's later run too, whose check is cached), naming both grids and sizes and the model name that
    embeds at the checkpoint's own size. A checkpoint of the model's own size, or that name, gives no warning."""
    from wdsembed.config import EmbedConfig, speaking_to
    from wdsembed.plan import check_model

    at_384, at_224 = tmp_path / "vit384.pth", tmp_path / "vit224.pth"
    torch.save(_seeded_model("vit_tiny_patch16_224", seed=1, img_size=384).state_dict(), at_384)
    torch.save(_seeded_model("vit_tiny_patch16_224", seed=1).state_dict(), at_224)
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"

    def warnings(checkpoint, model_name=name) -> list[str]:
        config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model_name=model_name,
                             pretrained=False, checkpoint=str(checkpoint))
        caplog.clear()
        with speaking_to("command"), caplog.at_level(logging.WARNING, logger="wdsembed"):
            check_model(config)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    said = (f"checkpoint '{at_384}' holds position embeddings for a patch grid of 24x24 (384 px images), but "
            f"{name!r}'s grid is 14x14 (224 px): timm resamples them to fit, and the run embeds at 224 px with that size's "
            "preprocessing, a size the weights were not trained at. To embed at the checkpoint's own size, pass "
            "--model vit_tiny_patch16_384.augreg_in21k_ft_in1k, timm's 384 px form of it, with this checkpoint")
    assert warnings(at_384) == [said]
    assert warnings(at_384) == [said]  # the process's next run: its check is cached, its warning is not
    assert warnings(at_224) == []
    assert warnings(at_384, "vit_tiny_patch16_384.augreg_in21k_ft_in1k") == []
    # the load itself is as before: timm's resampled weights, the model's own size and preprocessing
    with speaking_to("command"):
        loaded = load_model(name, checkpoint=str(at_384))
    assert loaded.data_config["input_size"] == (3, 224, 224) and loaded.checkpoint_warning == said
    assert load_model(name, checkpoint=str(at_224)).checkpoint_warning is None
    # where timm names no model at the checkpoint's size: a local-dir: model built at it, which embeds at 384 px
    deit = load_model("deit_tiny_patch16_224", checkpoint=str(at_384), device="meta").checkpoint_warning
    assert deit.endswith("pass --model (model_name=) local-dir:FOLDER with this checkpoint, FOLDER written by "
                         "timm.models.save_for_hf(timm.create_model('deit_tiny_patch16_224', img_size=384), FOLDER) "
                         "(timm names no 384 px form of 'deit_tiny_patch16_224')"), deit
    timm.models.save_for_hf(timm.create_model("deit_tiny_patch16_224", img_size=384), tmp_path / "folder")
    at_its_size = load_model(f"local-dir:{tmp_path / 'folder'}", checkpoint=str(at_384))
    assert at_its_size.checkpoint_warning is None and at_its_size.data_config["input_size"] == (3, 384, 384)


def test_a_vit_checkpoint_of_a_non_square_grid_is_refused_not_resampled_unsaid(tmp_path):
    """A checkpoint fine-tuned at 256x384 px (a 16x24 grid): its tensor holds 384 positions, not their grid, and
    timm takes a source grid it cannot read from the model's config to be square. It refuses the load (no silent
    resampling for the checkpoint warning to tell of: model._resampled_positions), before any work; a local-dir:
    model built at that size loads it without a warning."""
    path = tmp_path / "vit_256x384.pth"
    torch.save(_seeded_model("vit_tiny_patch16_224", seed=1, img_size=(256, 384)).state_dict(), path)
    for name in ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit_tiny_patch16_384.augreg_in21k_ft_in1k"):
        with pytest.raises(ModelLoadError, match=rf"checkpoint '{re.escape(str(path))}' does not fit '{name}'"):
            load_model(name, checkpoint=str(path), device="meta")
    timm.models.save_for_hf(timm.create_model("vit_tiny_patch16_224", img_size=(256, 384)), tmp_path / "folder")
    at_its_size = load_model(f"local-dir:{tmp_path / 'folder'}", checkpoint=str(path), device="meta")
    assert at_its_size.checkpoint_warning is None and at_its_size.data_config["input_size"] == (3, 256, 384)


def test_a_clip_checkpoint_in_openai_layout_of_another_size_is_warned_of_too(tmp_path):
    name = "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
    path = tmp_path / "openai_clip_288.pth"
    torch.save(_openai_clip_layout(_seeded_model(name, seed=11, img_size=288).state_dict()), path)
    said = load_model(name, checkpoint=str(path), device="meta").checkpoint_warning
    assert said and "a patch grid of 18x18 (288 px images)" in said and "grid is 14x14 (224 px)" in said, said


def _fill_hub_cache(cache: str, repo: str, filename: str, write) -> None:
    """The Hugging Face cache layout: refs/main names a snapshot that holds the file."""
    commit = "0" * 40
    folder = os.path.join(cache, f"models--{repo.replace('/', '--')}")
    os.makedirs(os.path.join(folder, "refs"))
    os.makedirs(os.path.join(folder, "snapshots", commit))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    write(os.path.join(folder, "snapshots", commit, filename))


def test_pretrained_from_the_cache_offline(resnet18):
    from safetensors.torch import save_file

    source = _seeded_model("resnet18", seed=99)
    cfg = timm.models.get_pretrained_cfg("resnet18")
    _fill_hub_cache(
        os.environ["HF_HUB_CACHE"],
        cfg.hf_hub_id,
        "model.safetensors",
        lambda p: save_file({k: v.contiguous() for k, v in source.state_dict().items()}, p),
    )
    loaded = load_model("resnet18", pretrained=True)
    assert loaded.weights == f"pretrained:{cfg.hf_hub_id}"
    x = _batch(loaded)
    with torch.inference_mode():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
    torch.testing.assert_close(embed_batch(loaded, x, autocast=False, normalize=False), expected)
    assert not _same_weights(loaded, resnet18)


def test_missing_weights_offline_fail_fast():
    t = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("vit_base_patch16_clip_224.openai", pretrained=True)
    assert time.monotonic() - t < 5
    msg = str(info.value)
    assert "vit_base_patch16_clip_224.openai" in msg
    assert "--checkpoint" in msg and "--no-pretrained" in msg and "HF_HUB_OFFLINE" in msg


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    t = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("resnet18.a1_in1k", pretrained=True)
    assert time.monotonic() - t < 6
    assert "resnet18.a1_in1k" in str(info.value) and "unreachable" in str(info.value)


@pytest.mark.parametrize(
    "name,suggested",
    [("resnet18x", "resnet18"), ("vit_base_patch16_clip_224.opanai", "vit_base_patch16_clip_224.openai"),
     # a tag that is a pattern of timm.list_pretrained's, or none after the dot: timm's own error is a RuntimeError
     ("resnet18.a1_*", "resnet18.a1_in1k"), ("resnet18.", "resnet18.a1_in1k"), ("resnet18.[a]1_in1k", "resnet18.a1_in1k"),
     # a Hub repo id without timm's prefix: the hf-hub: form, beside the timm name it holds
     ("timm/resnet18.a1_in1k", "'hf-hub:timm/resnet18.a1_in1k'"), ("timm/resnet18.a1_in1k", "resnet18.a1_in1k,")],
)
def test_unknown_model_names(name, suggested):
    with pytest.raises(ModelLoadError) as info:
        load_model(name, pretrained=False)
    assert name in str(info.value)
    assert suggested in str(info.value)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
@pytest.mark.parametrize("embedding", ["pooled", "head"])
def test_the_compiled_forward_gives_the_eager_embeddings(embedding):
    """compile_embedding (what a GPU worker captures in its CUDA graph by default) is the same function as
    embed_batch: the same rows, for the pooled features and for the head, normalized or not."""
    from wdsembed.model import compile_embedding

    loaded = load_model("test_vit.r160_in1k", pretrained=False, device="cpu", embedding=embedding)
    x = _batch(loaded, n=3)
    for normalize in (True, False):
        eager = embed_batch(loaded, x, autocast=False, normalize=normalize)
        with torch.inference_mode():
            compiled = compile_embedding(loaded, normalize=normalize)(x)
        assert compiled.dtype == torch.float32 and compiled.shape == eager.shape == (3, loaded.dim)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(embed_batch(loaded, x, autocast=False, normalize=True),
                              embed_batch(loaded, x, autocast=False, normalize=False))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_each_model_compiled_in_one_process_keeps_its_own_weights():
    """A long-lived worker process builds a new Worker (and compiles anew) when the model changes: the weights are
    frozen into each compiled function, so none may run another's. Eleven in a row, past dynamo's recompile limit."""
    from wdsembed.model import compile_embedding

    x = torch.randn(2, 8)
    for seed in range(11):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 4)).eval()
        loaded = LoadedModel(model=model, name=f"m{seed}", weights="random-init", embedding="head", dim=4,
                             data_config={}, device=torch.device("cpu"))
        with torch.inference_mode():
            compiled = compile_embedding(loaded, normalize=False)(x)
        torch.testing.assert_close(compiled, embed_batch(loaded, x, autocast=False, normalize=False))
