"""The C-GSPN student, the isomorphic ViT and the adaptors: shapes, backends, parameter budget, teacher init."""
import pytest
import torch

from cgspn.models.adaptors import Adaptors, match_grid
from cgspn.models.cgspn import CGSPN, CGSPNConfig, cgspn_from_teacher_config, describe_init, init_from_teacher
from cgspn.models.gspn_mixer import GSPNMixerConfig
from cgspn.models.vit import ViT, ViTConfig, isomorphic_vit, parameter_count

TINY_VIT = ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_hidden=64, pos_grid=4, layer_scale=0.1)


def tiny_student(backend=None, **mixer):
    cfg = dict(proxy_dim=8, groups=2, backend=backend) | mixer
    return cgspn_from_teacher_config(TINY_VIT, mixer=GSPNMixerConfig(**cfg), summary_hidden=48)


@pytest.mark.parametrize("size", [(28, 28), (21, 35), (49, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_shapes_at_any_multiple_of_the_patch(size):
    H, W = size
    images = torch.randn(2, 3, H, W)
    for model in (tiny_student(), ViT(TINY_VIT)):
        out = model(images, return_blocks=True)
        assert out.patch_tokens.shape == (2, H // 7, W // 7, 32)
        assert out.summary.shape == (2, 32)
        assert len(out.block_inputs) == len(out.mixer_outputs) == 2
    n_student = out.block_inputs[0].shape[1]  # the ViT's include its CLS token
    assert n_student == (H // 7) * (W // 7) + 1


def test_bad_size_names_nearest_valid_sizes():
    with pytest.raises(ValueError, match=r"height 30 -> nearest valid 28 or 35"):
        tiny_student()(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"width 230 -> nearest valid 224 or 238"):
        cgspn_from_teacher_config(ViTConfig(depth=1))(torch.randn(1, 3, 224, 230))


def test_student_backends_agree_forward_and_backward():
    """The reference and Triton (interpreter) scans give the same student outputs and parameter gradients."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 21, 28)
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        model = tiny_student(backend, chunk=2)
        for p in model.parameters():  # a non-trivial operator, not the near-identity initialization
            p.data.add_(0.05 * torch.randn_like(p))
        out = model(images)
        loss = (out.patch_tokens**2).mean() + out.summary.square().mean()
        loss.backward()
        results.append((out.patch_tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (tri, tri_grads) = results
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(tri_grads[name], g, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_default_student_has_at_most_85_percent_of_the_vit_parameters():
    vit = isomorphic_vit()
    student = cgspn_from_teacher_config(vit.cfg)
    n_vit, n_student = parameter_count(vit), parameter_count(student)
    print(f"isomorphic ViT-S/14: {n_vit:,} parameters; C-GSPN student: {n_student:,} ({n_student / n_vit:.1%})")
    assert n_student <= 0.85 * n_vit


def test_init_from_teacher_copies_what_it_reports():
    teacher, student = ViT(TINY_VIT), tiny_student()
    for p in teacher.parameters():
        p.data.normal_()
    report = init_from_teacher(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    assert report["copied"], "nothing copied"
    for name in report["copied"]:
        assert torch.equal(s[name], t[name]), name
    for name in report["fresh"]:
        assert name not in t or t[name].shape != s[name].shape
    assert all(".attn." in n or n.startswith("summary_head") for n in report["fresh"])
    assert {"cls_token", "pos_embed"} <= set(report["skipped"])
    assert "patch_embed.proj.weight" in report["copied"] and "blocks.1.mlp.fc2.bias" in report["copied"]
    assert "copied" in describe_init(report)


def test_mixer_forward_matches_the_block_inside_the_model():
    student = tiny_student()
    out = student(torch.randn(1, 3, 14, 21), return_blocks=True)
    alone = student.mixer_forward(1, out.block_inputs[1], (2, 3))
    torch.testing.assert_close(alone, out.mixer_outputs[1])


def test_bad_mixer_config_names_the_field():
    with pytest.raises(ValueError, match="groups=3 must divide proxy_dim=8"):
        tiny_student(groups=3)
    with pytest.raises(ValueError, match="unknown CGSPNConfig fields"):
        cgspn_from_teacher_config(TINY_VIT, heads=4)


def test_adaptors_and_target_grid():
    adaptors = Adaptors(32, {"a": 48, "b": 16})
    summary, spatial = adaptors["a"](torch.randn(2, 32), torch.randn(2, 3, 5, 32))
    assert summary.shape == (2, 48) and spatial.shape == (2, 3, 5, 48)
    target = torch.randn(2, 6, 10, 16)
    assert match_grid(target, (6, 10)) is target
    resized = match_grid(target, (3, 5))
    assert resized.shape == (2, 3, 5, 16)
    const = torch.ones(1, 7, 7, 4) * 2.5  # resizing keeps a constant field constant
    torch.testing.assert_close(match_grid(const, (4, 9)), torch.full((1, 4, 9, 4), 2.5))


def test_student_config_defaults_follow_the_teacher():
    student = cgspn_from_teacher_config(ViTConfig(depth=1), mixer=GSPNMixerConfig(proxy_dim=32, groups=1))
    assert isinstance(student, CGSPN) and student.cfg.dim == 384 and student.cfg.patch_size == 14
    assert isinstance(student.cfg, CGSPNConfig) and student.cfg.mixer.proxy_dim == 32
