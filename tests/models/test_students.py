"""The timm student (mask token, normalisation, drop path, kdforge attention), projection head and grid checks."""

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import KdforgeError, RecipeError, ShapeError
from kdforge.plugins import create, get_registry
from kdforge.students import ProjectionHead, StudentOutput, check_grids, resize_patches
from kdforge.students.timm_student import KdforgeAttention, RelativePositionBias, TimmStudent
from model_helpers import TINY_MODEL, TINY_VIT


def _student(**overrides):
    table = {"plugin": "timm", "model": TINY_MODEL, "model_kwargs": dict(TINY_VIT), **overrides}
    torch.manual_seed(0)
    return create("students", table, "student")


def _images(b=3, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_builtin_student_is_registered():
    assert "timm" in get_registry().names("students")


@pytest.mark.parametrize(
    "kwargs, prefix",
    [({}, 1), ({"reg_tokens": 4}, 5), ({"class_token": False, "global_pool": "avg"}, 0)],
    ids=["cls", "cls+registers", "no-cls"],
)
def test_student_output_contract(kwargs, prefix):
    s = _student(model_kwargs={**TINY_VIT, **kwargs}).eval()
    x = _images()
    out = s(x)
    assert isinstance(out, StudentOutput)
    assert out.cls.shape == (3, 32) and out.patches.shape == (3, 16, 32) and out.grid == (4, 4) == s.grid((16, 16))
    assert s.embed_dim == 32 and s.patch_size == 4
    # normalised with the model's mean/std (0.5, 0.5 for vit_tiny_patch16_224), registers dropped
    ref = s.model.forward_features((x - 0.5) / 0.5)
    if prefix:
        torch.testing.assert_close(out.patches, ref[:, prefix:])
        torch.testing.assert_close(out.cls, ref[:, 0])
    else:  # global_pool "avg": timm's final norm comes after the pooling (fc_norm), applied to every token here
        torch.testing.assert_close(out.patches, s.model.fc_norm(ref))
        torch.testing.assert_close(out.cls, s.model.fc_norm(ref.mean(1)))
    torch.testing.assert_close(s.features(x), out.cls)
    assert out.patches.requires_grad  # a student trains


@pytest.mark.parametrize(
    "kwargs", [{"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}], ids=["cls+registers", "no-cls"]
)
def test_intermediate_layers_are_the_last_blocks_and_end_with_the_forward_output(kwargs):
    s = _student(model_kwargs={**TINY_VIT, "depth": 3, **kwargs}).eval()
    x = _images()
    out, layers = s(x), s.intermediate_layers(x, 3)
    assert len(layers) == 3 and all(isinstance(o, StudentOutput) and o.patches.shape == (3, 16, 32) for o in layers)
    torch.testing.assert_close(layers[-1].cls, out.cls)
    torch.testing.assert_close(layers[-1].patches, out.patches)
    # the first of three is block 1 through the final norm (registers and the CLS split off as in forward)
    m = s.model
    first = m.blocks[0](m.norm_pre(m._pos_embed(m.patch_embed((x - s.mean) / s.std))))
    prefix = m.num_prefix_tokens
    if prefix:
        torch.testing.assert_close(layers[0].cls, m.norm(first)[:, 0])
        torch.testing.assert_close(layers[0].patches, m.norm(first)[:, prefix:])
    else:  # fc_norm after the pooling, as in forward
        torch.testing.assert_close(layers[0].cls, m.fc_norm(first.mean(dim=1)))
    with pytest.raises(KdforgeError, match="has 3 block.*last 4"):
        s.intermediate_layers(x, 4)


def _manual_masked_forward(s: TimmStudent, x, mask):
    """What masking must mean: patch embeddings replaced by the mask token, then position embedding, blocks, norm."""
    m = s.model
    tokens = m.patch_embed((x - s.mean) / s.std)
    tokens = torch.where(mask.reshape(tokens.shape[:-1]).unsqueeze(-1), s.mask_token, tokens)
    tokens = m.norm_pre(m.patch_drop(m._pos_embed(tokens)))
    for blk in m.blocks:
        tokens = blk(tokens)
    return m.norm(tokens)


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic_img_size"])
def test_mask_token_replaces_masked_patch_embeddings_before_the_position_embedding(dynamic):
    s = _student(model_kwargs={**TINY_VIT, "dynamic_img_size": dynamic}, mask_token_init="trunc_normal").eval()
    x = _images()
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True
    mask[2, :8] = True
    out = s(x, mask=mask)
    torch.testing.assert_close(out.patches, _manual_masked_forward(s, x, mask)[:, 1:])
    plain = s(x)
    # image 1 has no masked patch: untouched; images 0 and 2 changed
    torch.testing.assert_close(out.patches[1], plain.patches[1])
    assert (out.patches[[0, 2]] - plain.patches[[0, 2]]).abs().amax() > 1e-3
    # an all-False mask is the same as no mask
    torch.testing.assert_close(s(x, mask=torch.zeros_like(mask)).patches, plain.patches)


def test_gradient_reaches_the_mask_token_only_through_masked_patches():
    s = _student()
    assert torch.count_nonzero(s.mask_token) == 0  # DINOv2's zeros init is the default
    x = _images()
    s(x, mask=torch.zeros(3, 16, dtype=torch.bool)).patches.square().sum().backward()
    assert s.mask_token.grad is None or torch.count_nonzero(s.mask_token.grad) == 0
    s.zero_grad()
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[1, 3:9] = True
    s(x, mask=mask).patches.square().sum().backward()
    assert s.mask_token.grad is not None and s.mask_token.grad.abs().sum() > 0


def test_mask_of_the_wrong_shape_is_rejected():
    s = _student()
    with pytest.raises(ShapeError, match=r"BoolTensor\[B, N\] = \[3, 16\] for a 4x4 patch grid, got torch.bool \(3, 15\)"):
        s(_images(), mask=torch.zeros(3, 15, dtype=torch.bool))
    with pytest.raises(ShapeError, match="torch.int64"):
        s(_images(), mask=torch.zeros(3, 16, dtype=torch.long))
    with pytest.raises(ShapeError, match="built for 16x16 px images but got 32x32"):
        s(_images(size=32))


def test_drop_path_rate_reaches_timm():
    s = _student(drop_path_rate=0.3, model_kwargs={**TINY_VIT, "depth": 3})
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in s.model.blocks]  # rate 0 is an Identity
    assert rates == pytest.approx([0.0, 0.15, 0.3])  # timm's linear decay up to the configured rate
    # active in training (two passes differ), off in eval (deterministic)
    x = _images()
    s.train()
    assert not torch.allclose(s(x).patches, s(x).patches)
    s.eval()
    torch.testing.assert_close(s(x).patches, s(x).patches)
    with pytest.raises(RecipeError, match="drop_path_rate must be in"):
        _student(drop_path_rate=1.5)


def test_student_config_errors_name_the_key():
    with pytest.raises(RecipeError, match="unknown key 'drop_path' in \\[student\\]: did you mean 'drop_path_rate'"):
        _student(drop_path=0.1)
    with pytest.raises(KdforgeError, match="is not a timm model: did you mean"):
        _student(model="vit_tiny_patch16_22", model_kwargs={})


def test_grad_checkpointing_gives_the_same_gradients():
    x = _images()
    grads = []
    for ckpt in (False, True):
        s = _student(grad_checkpointing=ckpt)
        s(x, mask=torch.ones(3, 16, dtype=torch.bool)).patches.sum().backward()
        grads.append(s.model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_kdforge_attention_matches_timm_attention(backend):
    x = _images()
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, ::3] = True
    ref = _student(model_kwargs={**TINY_VIT, "qk_norm": True, "reg_tokens": 1})
    fused = _student(model_kwargs={**TINY_VIT, "qk_norm": True, "reg_tokens": 1}, attention="kdforge",
                     attention_backend=backend)
    assert all(isinstance(b.attn, KdforgeAttention) for b in fused.model.blocks)
    assert fused.state_dict().keys() == ref.state_dict().keys()  # checkpoints are interchangeable
    fused.load_state_dict(ref.state_dict())
    out_ref, out = ref(x, mask=mask), fused(x, mask=mask)
    torch.testing.assert_close(out.patches, out_ref.patches, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.cls, out_ref.cls, atol=1e-5, rtol=1e-4)
    (out_ref.patches.square().sum() + out_ref.cls.sum()).backward()
    (out.patches.square().sum() + out.cls.sum()).backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), fused.named_parameters()):
        if p_ref.grad is not None:
            # float32 rounding differs between backends, so compare relative to the gradient's norm; the floor
            # covers gradients that are zero in exact arithmetic (k_norm's bias: softmax ignores a shift of all keys)
            err, size = float((p.grad - p_ref.grad).norm()), float(p_ref.grad.norm())
            assert err <= 1e-3 * size + 1e-5, f"{name}: |grad - ref| = {err:.3g}, |ref| = {size:.3g}"


def test_kdforge_attention_calls_kdforge_ops(monkeypatch):
    import kdforge.ops

    calls = []
    real = kdforge.ops.attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(kdforge.ops, "attention", spy)
    s = _student(attention="kdforge")
    s(_images())
    assert len(calls) == 2  # one per block
    shape, kwargs = calls[0]
    assert shape == (3, 2, 17, 16) and kwargs["bias"] is None and kwargs["scale"] == pytest.approx(16**-0.5)


def test_relative_position_bias_depends_on_the_offset_only():
    """Bias[h, i, j] is the table row of patch j's offset from patch i (the same offset, the same value); prefix
    tokens use three rows of their own (prefix -> patch, patch -> prefix, prefix -> prefix)."""
    gh, gw, prefix, heads = 3, 4, 2, 5
    rpb = RelativePositionBias((gh, gw), heads, prefix)
    assert rpb.table.shape == ((2 * gh - 1) * (2 * gw - 1) + 3, heads)
    assert torch.count_nonzero(rpb()) == 0  # starts as no bias
    with torch.no_grad():
        rpb.table.copy_(torch.randn(rpb.table.shape, generator=torch.Generator().manual_seed(0)))
    bias = rpb()
    assert bias.shape == (heads, prefix + gh * gw, prefix + gh * gw) and bias.is_contiguous()
    pos = [(r, c) for r in range(gh) for c in range(gw)]
    by_offset = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            value = bias[:, prefix + i, prefix + j]
            seen = by_offset.setdefault((ri - rj, ci - cj), value)
            assert torch.equal(seen, value)
    assert len(by_offset) == (2 * gh - 1) * (2 * gw - 1)  # every offset has its own row
    rows = torch.stack(list(by_offset.values()))
    special = [bias[:, 0, prefix:], bias[:, prefix:, 1], bias[:, :prefix, :prefix].reshape(heads, -1)]
    for block in special:  # one value per head across the block, distinct from every offset's
        assert torch.equal(block, block[:, :1].expand_as(block))
        assert not (rows == block[:, 0]).all(dim=1).any()


def _rpb_student(kind, **overrides):
    kwargs = {**TINY_VIT, "pos_embed": "none", "reg_tokens": 1}
    return _student(model_kwargs=kwargs, attention="kdforge", rel_pos_bias=kind, **overrides)


def test_shared_relative_position_bias_reaches_every_block(monkeypatch):
    import kdforge.ops

    s = _rpb_student("shared")
    assert s.model.pos_embed is None
    assert [n for n, _ in s.named_parameters() if "rel_pos" in n] == ["rel_pos_bias.table"]
    assert "rel_pos_bias.table" in s.state_dict() and not any("index" in k for k in s.state_dict())
    with torch.no_grad():
        s.rel_pos_bias.table.normal_()
    seen, real = [], kdforge.ops.attention
    monkeypatch.setattr(kdforge.ops, "attention", lambda *a, **kw: seen.append(kw["bias"]) or real(*a, **kw))
    out = s(_images())
    assert len(seen) == 2 and all(torch.equal(b, s.rel_pos_bias()) for b in seen)
    assert seen[0].shape == (2, 18, 18)  # heads, 1 cls + 1 register + 16 patches
    out.patches.square().sum().backward()
    assert s.rel_pos_bias.table.grad is not None and torch.count_nonzero(s.rel_pos_bias.table.grad) > 0


def test_relative_position_bias_changes_the_output_and_backends_agree():
    x = _images()
    a = _rpb_student("per_block", attention_backend="reference")
    b = _rpb_student("per_block", attention_backend="auto")
    assert [n for n, _ in a.named_parameters() if "rel_pos" in n] == ["rel_pos_biases.0.table", "rel_pos_biases.1.table"]
    b.load_state_dict(a.state_dict())
    plain = a(x).patches.detach()
    with torch.no_grad():
        for m in (a, b):
            for i, rpb in enumerate(m.rel_pos_biases):
                rpb.table.copy_(torch.randn(rpb.table.shape, generator=torch.Generator().manual_seed(i)))
    out_a, out_b = a(x), b(x)
    assert (out_a.patches - plain).abs().max() > 1e-2  # the bias is used
    torch.testing.assert_close(out_b.patches, out_a.patches, atol=1e-5, rtol=1e-4)
    out_a.patches.sum().backward()
    out_b.patches.sum().backward()
    for ra, rb in zip(a.rel_pos_biases, b.rel_pos_biases):
        torch.testing.assert_close(rb.table.grad, ra.table.grad, atol=1e-5, rtol=1e-4)


def test_relative_position_bias_with_grad_checkpointing():
    x = _images()
    grads = []
    for ckpt in (False, True):
        s = _rpb_student("shared", grad_checkpointing=ckpt)
        with torch.no_grad():
            s.rel_pos_bias.table.normal_(generator=torch.Generator().manual_seed(0))
        s(x).patches.square().sum().backward()
        grads.append(s.rel_pos_bias.table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_relative_position_bias_errors_and_weight_decay():
    from kdforge.engine.optim import param_groups

    with pytest.raises(RecipeError, match="attention = 'kdforge'"):
        _student(rel_pos_bias="shared")
    dynamic = _student(
        model_kwargs={**TINY_VIT, "pos_embed": "none", "reg_tokens": 1, "dynamic_img_size": True},
        attention="kdforge",
        rel_pos_bias="shared",
    )
    with pytest.raises(KdforgeError, match="covers 18 tokens but the input has 38"):
        dynamic(_images(size=24))
    s = _rpb_student("shared")
    decay, no_decay = param_groups(s, 0.05)
    assert any(p is s.rel_pos_bias.table for p in no_decay["params"])
    assert not any(p is s.rel_pos_bias.table for p in decay["params"])


def test_kdforge_attention_refuses_what_it_cannot_do():
    with pytest.raises(KdforgeError, match="attn_drop_rate = 0"):
        _student(attention="kdforge", model_kwargs={**TINY_VIT, "attn_drop_rate": 0.1})
    eva = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
    with pytest.raises(KdforgeError, match="EvaAttention"):
        _student(model="eva02_tiny_patch14_224", model_kwargs=eva, attention="kdforge")


def test_eva_student_masks_too():
    eva = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
    s = _student(model="eva02_tiny_patch14_224", model_kwargs=eva).eval()
    x = _images()
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :4] = True
    out, plain = s(x, mask=mask), s(x)
    assert out.patches.shape == (3, 16, 32)
    torch.testing.assert_close(out.patches[1:], plain.patches[1:])
    assert (out.patches[0] - plain.patches[0]).abs().amax() > 1e-3


# ----------------------------------------------------------------------------------------------- heads and grids
def test_projection_head_is_layernorm_then_linear():
    torch.manual_seed(0)
    head = ProjectionHead(32, 48)
    x = torch.randn(2, 5, 32) * 7 + 3
    expected = F.linear(F.layer_norm(x, (32,), head.norm.weight, head.norm.bias), head.linear.weight, head.linear.bias)
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (2, 5, 48) and head(x[:, 0]).shape == (2, 48)
    with pytest.raises(ShapeError, match=r"expects \[\.\.\., 32\]"):
        head(torch.randn(2, 31))


class _Grid:
    def __init__(self, model_name, patch_size):
        self.model_name, self.patch_size = model_name, patch_size

    def grid(self, size):
        return size[0] // self.patch_size, size[1] // self.patch_size


def test_grid_mismatch_message_names_models_and_fixes():
    teacher, student = _Grid("dinov2_vitb14", 14), _Grid("vit_small_patch16", 16)
    expected = (
        "teacher dinov2_vitb14 gives a 16x16 patch grid at 224 px (patch 14) but student vit_small_patch16 gives "
        "14x14 (patch 16): use a student with patch size 14, set student.model_kwargs.patch_size = 14, or set "
        "train.resize_teacher_grid = true"
    )
    with pytest.raises(ShapeError) as info:
        check_grids(teacher, student, (224, 224), resize=False)
    assert str(info.value) == expected
    assert check_grids(teacher, student, 224, resize=True) == ((16, 16), (14, 14))
    assert check_grids(teacher, _Grid("vit_small_patch14", 14), (224, 224), resize=False) == ((16, 16), (16, 16))


def test_check_grids_with_real_models(hub_dir):
    teacher = create("teachers", {"plugin": "torch_hub", "repo": str(hub_dir), "model": "dinov2_tiny",
                                  "source": "local", "pretrained": False}, "teacher")
    ok = _student()
    assert check_grids(teacher, ok, (16, 16), resize=False) == ((4, 4), (4, 4))
    wide = _student(model_kwargs={**TINY_VIT, "patch_size": 8})
    with pytest.raises(ShapeError, match=r"teacher dinov2_tiny gives a 4x4 .* student vit_tiny_patch16_224 gives 2x2"):
        check_grids(teacher, wide, (16, 16), resize=False)


def test_resize_patches_is_bilinear_on_the_grid():
    b, d = 2, 3
    # a linear ramp over the image stays a linear ramp, sampled at the new patch centres
    def ramp(g):
        centres = (torch.arange(g, dtype=torch.float64) + 0.5) / g  # in [0, 1] image units
        field = centres.view(g, 1) * 2 + centres.view(1, g) * 5  # [g, g]
        return field.flatten().view(1, -1, 1).expand(b, -1, d).contiguous()

    out = resize_patches(ramp(16), (16, 16), (14, 14))
    assert out.shape == (b, 196, d)
    interior = out.view(b, 14, 14, d)[:, 1:-1, 1:-1]  # the border clamps (align_corners=False), the inside is exact
    torch.testing.assert_close(interior, ramp(14).view(b, 14, 14, d)[:, 1:-1, 1:-1])
    x = torch.randn(b, 12, d)
    assert resize_patches(x, (3, 4), (3, 4)) is x
    ref = F.interpolate(x.transpose(1, 2).reshape(b, d, 3, 4), size=(6, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_patches(x, (3, 4), (6, 2)), ref.flatten(2).transpose(1, 2))
    assert resize_patches(x.bfloat16(), (3, 4), (6, 2)).dtype == torch.bfloat16
    with pytest.raises(ShapeError, match=r"expected patches \[B, 4\*4, D\]"):
        resize_patches(x, (4, 4), (2, 2))


def test_fd_student_options_layer_scale_depth_scaled_init_and_qkv_bias():
    # plugins/fd.toml's student: LayerScale 0.1, BEiT's depth-scaled init of attn.proj / mlp.fc2 (timm's fix_init),
    # q/k/v bias, through model_kwargs
    kwargs = {**TINY_VIT, "embed_dim": 96, "depth": 4, "num_heads": 3, "pos_embed": "none"}
    fd = _student(model_kwargs={**kwargs, "init_values": 0.1, "fix_init": True, "qkv_bias": True})
    plain = _student(model_kwargs=kwargs)
    blocks = fd.model.blocks
    assert all(torch.equal(b.ls1.gamma, torch.full((96,), 0.1)) and torch.equal(b.ls2.gamma, torch.full((96,), 0.1))
               for b in blocks)
    assert all(b.attn.qkv.bias is not None for b in blocks)
    for name in ("attn.proj", "mlp.fc2"):
        stds = [float(b.get_submodule(name).weight.std()) for b in blocks]
        plain_stds = [float(b.get_submodule(name).weight.std()) for b in plain.model.blocks]
        for layer, (s, p) in enumerate(zip(stds, plain_stds)):
            assert abs(s * (2 * (layer + 1)) ** 0.5 / p - 1) < 0.1, (name, layer, s, p)  # std / sqrt(2 (l + 1))
