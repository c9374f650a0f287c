"""The C-GSPN student (issue 3): any-resolution shapes, size errors, reference vs Triton backends end to end,
the parameter budget against the isomorphic ViT, teacher initialization, the mixer alone, and the adaptors."""
import pytest
import torch
import torch.nn.functional as F

from cgspn.models.adaptors import Adaptors, match_grid
from cgspn.models.cgspn import CGSPN, cgspn_from_teacher_config, describe_init, init_from_teacher
from cgspn.models.gspn_mixer import GSPNMixer, GSPNMixerConfig
from cgspn.models.vit import ViT, ViTConfig, ViTOutput, isomorphic_vit, parameter_count

TINY = ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_hidden=64, pos_grid=4, layer_scale=0.1)


def tiny_student(backend="reference", **mixer) -> CGSPN:
    cfg = dict(proxy_dim=8, groups=2, backend=backend) | mixer
    return cgspn_from_teacher_config(TINY, mixer=GSPNMixerConfig(**cfg), summary_hidden=48)


@pytest.mark.parametrize("size", [(28, 28), (28, 35), (14, 49), (42, 21)], ids=lambda s: f"H{s[0]}-W{s[1]}")
def test_shapes_at_any_multiple_of_the_patch(size):
    H, W = size
    h, w = H // 7, W // 7
    out = tiny_student()(torch.randn(2, 3, H, W), return_blocks=True)
    assert isinstance(out, ViTOutput)
    assert out.patch_tokens.shape == (2, h, w, 32) and out.summary.shape == (2, 32)
    assert len(out.block_inputs) == len(out.mixer_outputs) == TINY.depth
    for y, m in zip(out.block_inputs, out.mixer_outputs):
        assert y.shape == m.shape == (2, h * w, 32)  # patch tokens only: no CLS token
    assert torch.isfinite(out.patch_tokens).all() and torch.isfinite(out.summary).all()


def test_student_has_no_position_embedding_or_cls_token():
    names = [n for n, _ in tiny_student().named_parameters()]
    assert not any("pos_embed" in n or "cls_token" in n for n in names)


@pytest.mark.parametrize(
    "size, message",
    [((30, 28), r"height 30 -> nearest valid 28 or 35"), ((28, 5), r"width 5 -> nearest valid 7 or 14")],
    ids=["H30", "W5"],
)
def test_bad_size_names_the_nearest_valid_sizes(size, message):
    with pytest.raises(ValueError, match=message):
        tiny_student()(torch.randn(1, 3, *size))


def test_mixer_starts_as_an_even_four_direction_diffusion():
    mixer = GSPNMixer(16, GSPNMixerConfig(proxy_dim=8, groups=2))
    G, Cp = 2, 8
    bias = mixer.heads.bias.view(4, 3 * G + 2 * Cp)
    assert torch.all(bias[:, : 3 * G] == 0)  # neutral gate logits: 1/3 each (1/2 at the edges)
    assert torch.all(bias[:, 3 * G : 3 * G + Cp] == 0)  # lam = sigmoid(0) = 1/2
    assert torch.all(bias[:, 3 * G + Cp :] == 1)  # u = 1
    assert mixer.heads.weight.abs().max() < 1e-2  # weak input dependence at the start
    torch.testing.assert_close(torch.softmax(mixer.merge_logits, 0), torch.full((4, Cp), 0.25))
    assert mixer(torch.randn(2, 3 * 5, 16), (3, 5)).shape == (2, 15, 16)


def test_mixer_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"groups=3 must divide proxy_dim=8"):
        GSPNMixer(16, GSPNMixerConfig(proxy_dim=8, groups=3))
    with pytest.raises(ValueError, match=r"chunk"):
        GSPNMixer(16, GSPNMixerConfig(proxy_dim=8, groups=2, chunk=0))
    with pytest.raises(ValueError, match=r"backend"):
        GSPNMixer(16, GSPNMixerConfig(proxy_dim=8, groups=2, backend="cuda-ish"))
    with pytest.raises(ValueError, match=r"grid 3x4 does not hold 15 tokens"):
        GSPNMixer(16, GSPNMixerConfig(proxy_dim=8, groups=2))(torch.randn(1, 15, 16), (3, 4))
    with pytest.raises(ValueError, match=r"unknown CGSPNConfig fields \['heads'\]"):
        cgspn_from_teacher_config(TINY, heads=4)


@pytest.mark.parametrize("chunk, compiled", [(None, False), (2, False), (None, True)],
                         ids=["global", "chunk2", "global-compiled"])
def test_student_backends_agree_forward_and_backward(chunk, compiled):
    """Reference and Triton (interpreter on CPU) scans: same outputs and parameter gradients, float32. Compiled:
    the Triton student under torch.compile in one graph (fullgraph: the scan is one custom op, no graph break),
    traced by Dynamo and AOTAutograd as on a GPU (backend aot_eager: the ops run eagerly, no code generation)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 28, 35)
    weights = (torch.randn(2, 4, 5, 32), torch.randn(2, 32))
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        model = tiny_student(backend, chunk=chunk)
        with torch.no_grad():  # move away from the near-neutral initialization so every input matters
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled and backend == "triton" else model
        out = run(images)
        loss = (out.patch_tokens * weights[0]).sum() + (out.summary * weights[1]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.patch_tokens.detach(), out.summary.detach(), grads))
    (ref_tok, ref_sum, ref_grads), (tri_tok, tri_sum, tri_grads) = results
    torch.testing.assert_close(tri_tok, ref_tok, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri_sum, ref_sum, rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == tri_grads.keys()
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(tri_grads[name], g, rtol=1e-4, atol=1e-4 * scale.item(), msg=lambda m: f"{name}: {m}")


def test_default_student_has_at_most_85_percent_of_the_isomorphic_vit():
    vit = isomorphic_vit()
    student = cgspn_from_teacher_config(vit.cfg)
    n_vit, n_student = parameter_count(vit), parameter_count(student)
    print(f"isomorphic ViT-S/14 {n_vit:,}; C-GSPN student {n_student:,} ({n_student / n_vit:.1%})")
    assert n_student <= 0.85 * n_vit
    assert student.cfg.dim == 384 and student.cfg.depth == 12 and student.cfg.mlp_hidden == 1536


def test_init_from_teacher_copies_exactly_what_it_reports():
    teacher, student = ViT(TINY), tiny_student()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = init_from_teacher(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    assert sorted(report["copied"] + report["fresh"]) == sorted(s)
    for name in report["copied"]:
        assert torch.equal(s[name], t[name]), name
    for name in report["fresh"]:
        assert torch.equal(s[name], before[name]), f"{name} is reported fresh but changed"
    mixer = {n for n in s if ".attn." in n}
    assert mixer and mixer <= set(report["fresh"])
    assert set(report["fresh"]) == mixer | {n for n in s if n.startswith("summary_head.")}
    expected = {"patch_embed.proj.weight", "norm.weight", "blocks.1.norm1.bias", "blocks.0.ls1.gamma",
                "blocks.1.mlp.fc2.bias", "blocks.0.norm2.weight", "blocks.1.ls2.gamma"}
    assert expected <= set(report["copied"])
    assert set(report["skipped"]) == set(t) - set(report["copied"])
    assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight"} <= set(report["skipped"])
    summary = describe_init(report)
    assert f"copied {len(report['copied'])} tensors" in summary and "blocks.*.attn" in summary


def test_mixer_forward_reproduces_the_mixer_inside_the_model():
    """Stage 1 feeds one mixer the teacher's normalized block input (its patch tokens, CLS dropped)."""
    student, teacher = tiny_student(), ViT(TINY)
    images = torch.randn(1, 3, 14, 21)
    out = student(images, return_blocks=True)
    torch.testing.assert_close(student.mixer_forward(1, out.block_inputs[1], (2, 3)), out.mixer_outputs[1])
    teacher_in = teacher(images, return_blocks=True).block_inputs[0][:, 1:]  # (B, h*w, D) without CLS
    assert student.mixer_forward(0, teacher_in, (2, 3)).shape == teacher_in.shape


def test_adaptors_shapes():
    adaptors = Adaptors(32, {"vits14": 48, "clip": 16})
    assert set(adaptors) == {"vits14", "clip"}
    summary, spatial = adaptors["vits14"](torch.randn(2, 32), torch.randn(2, 3, 5, 32))
    assert summary.shape == (2, 48) and spatial.shape == (2, 3, 5, 48)
    summary, spatial = adaptors["clip"](torch.randn(2, 32), torch.randn(2, 4, 4, 32))
    assert summary.shape == (2, 16) and spatial.shape == (2, 4, 4, 16)
    with pytest.raises(ValueError, match="teacher_dims"):
        Adaptors(32, {})


def test_block_heads_predict_intermediate_blocks_and_survive_a_save(tmp_path):
    from cgspn.models.students import load_adaptors, save_adaptors

    adaptors = Adaptors(32, {"vits14": 48, "clip": 16}, hidden=40, blocks={"vits14": [8, 10]})
    assert sorted(adaptors["vits14"].blocks) == ["10", "8"] and len(adaptors["clip"].blocks) == 0
    tokens = torch.randn(2, 3, 5, 32)
    assert adaptors["vits14"].blocks["8"](tokens).shape == (2, 3, 5, 48)
    save_adaptors(adaptors, tmp_path / "adaptors.safetensors")
    loaded = load_adaptors(tmp_path / "adaptors.safetensors")
    torch.testing.assert_close(loaded["vits14"].blocks["10"](tokens), adaptors["vits14"].blocks["10"](tokens))
    with pytest.raises(ValueError, match="not in teacher_dims"):
        Adaptors(32, {"vits14": 48}, blocks={"other": [3]})
    with pytest.raises(ValueError, match="block indices"):
        Adaptors(32, {"vits14": 48}, blocks={"vits14": [-1]})


def test_target_is_interpolated_bilinearly_to_the_student_grid():
    target = torch.randn(2, 6, 10, 16)
    assert match_grid(target, (6, 10)) is target
    up = match_grid(target, (9, 15))
    expected = F.interpolate(target.permute(0, 3, 1, 2), size=(9, 15), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, expected.permute(0, 2, 3, 1))
    assert match_grid(target, (3, 5)).shape == (2, 3, 5, 16)
    const = torch.full((1, 7, 7, 4), 2.5, dtype=torch.bfloat16)  # constants stay constant, dtype kept
    down = match_grid(const, (4, 9))
    assert down.dtype == torch.bfloat16
    torch.testing.assert_close(down.float(), torch.full((1, 4, 9, 4), 2.5))


def test_student_config_follows_the_teacher_and_refuses_unknown_fields():
    student = cgspn_from_teacher_config(ViTConfig(depth=1), mixer=GSPNMixerConfig(proxy_dim=32, groups=1))
    assert (student.cfg.dim, student.cfg.patch_size, student.cfg.mlp_hidden) == (384, 14, 1536)
    assert student.cfg.mixer.proxy_dim == 32
    with pytest.raises(ValueError, match="unknown CGSPNConfig fields"):
        cgspn_from_teacher_config(TINY, heads=4)


def test_teacher_architecture_at_non_square_sizes():
    out = ViT(TINY)(torch.randn(2, 3, 21, 35), return_blocks=True)
    assert out.patch_tokens.shape == (2, 3, 5, 32) and out.summary.shape == (2, 32)
    assert out.block_inputs[0].shape == (2, 1 + 15, 32)  # token 0 is the CLS token
