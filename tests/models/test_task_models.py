"""Task-specific distillation's models: the timm student in feature-map mode (CNNs, FastViT, MobileViT-V2) and with
its own classifier, the "encoder" student (a foundation model probed or finetuned on a task) and the "adapted"
teacher (that finished run, frozen, with its logits)."""

import time
import warnings

import pytest
import timm
import torch
from torch import nn

from kdforge.engine.optim import param_groups
from kdforge.errors import KdforgeError, RecipeError
from kdforge.plugins import create
from kdforge.students import StudentOutput
from kdforge.teachers.timm_teacher import TimmTeacher
from model_helpers import TINY_ENCODER_TEACHER, TINY_MODEL, TINY_VIT, write_adaptation_run

#: A ResNet a few thousand times smaller than resnet18: resnet10t with narrow stages.
SMALL_RESNET = ("resnet10t", {"channels": (8, 16, 32, 64), "stem_width": 8})
CNNS = [SMALL_RESNET, ("mobilenetv3_small_050", {})]


def _build(kind, table, where):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random timm weights on purpose
        return create(kind, table, where)


def _cnn(name, kwargs, **extra):
    torch.manual_seed(0)
    return _build("students", {"plugin": "timm", "model": name, "model_kwargs": kwargs, **extra}, "student")


def _images(b=2, size=64, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- timm student, CNNs
@pytest.mark.parametrize("name, kwargs", CNNS, ids=[n for n, _ in CNNS])
def test_cnn_student_gives_its_last_feature_map_as_patches_and_its_classifier_logits(name, kwargs):
    s = _cnn(name, kwargs, num_classes=5).eval()
    x = _images()
    out = s(x)
    assert isinstance(out, StudentOutput)
    y = s.model.forward_features((x - s.mean) / s.std)  # NCHW, normalised with the model's own statistics
    c, h, w = y.shape[1:]
    assert s.embed_dim == c and out.grid == (h, w) == s.grid((64, 64)) and s.patch_size == 32
    torch.testing.assert_close(out.patches, y.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))
    torch.testing.assert_close(out.logits, s.model.forward_head(y))
    assert out.logits.shape == (2, 5)
    assert not any("mask_token" in k for k in s.state_dict())  # nothing to mask, no mask token


@pytest.mark.parametrize("name, kwargs", CNNS, ids=[n for n, _ in CNNS])
def test_cnn_student_trains_every_parameter(name, kwargs):
    s = _cnn(name, kwargs, num_classes=3).train()
    out = s(_images(b=4, size=48))
    (out.cls.square().mean() + out.patches.square().mean() + out.logits.logsumexp(-1).mean()).backward()
    missing = [n for n, p in s.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert len(param_groups(s, 0.05)[0]["params"]) > 0  # conv weights decayed, norms and biases not


def test_cnn_student_without_classes_has_no_classifier():
    s = _cnn(*SMALL_RESNET)
    assert s(_images()).logits is None
    assert not any(k.startswith("model.fc.") for k in s.state_dict())


def test_cnn_grid_is_probed_in_eval_mode_for_sizes_that_are_not_multiples_of_the_stride():
    s = _cnn(*SMALL_RESNET).train()
    bn = s.model.bn1
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    grid = s.grid((50, 70))  # padding rounds up: not 50 // 32 x 70 // 32
    assert grid == (2, 3)
    assert s.training and bn.training  # the student's modes are restored ...
    torch.testing.assert_close(bn.running_mean, before[0])  # ... and the blank probe image left no statistics
    assert int(bn.num_batches_tracked) == int(before[1])
    out = s(torch.rand(2, 3, 50, 70))
    assert out.grid == grid and out.patches.shape == (2, 6, s.embed_dim)


def test_cnn_student_refuses_what_only_a_vit_can_do():
    s = _cnn(*SMALL_RESNET)
    with pytest.raises(KdforgeError, match="feature-map mode.*no patch tokens to mask.*masked view"):
        s(_images(), mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(KdforgeError, match="feature-map mode.*no per-block tokens.*knn, linear_probe"):
        s.intermediate_layers(_images(), 2)
    with pytest.raises(KdforgeError, match="layer-wise lr decay.*set optim.layer_decay = 1.0"):
        param_groups(nn.ModuleDict({"student": s}), 0.05, layer_decay=0.65)
    with pytest.raises(KdforgeError, match="not a vision transformer.*attention = 'kdforge' and rel_pos_bias"):
        _cnn(*SMALL_RESNET, attention="kdforge", rel_pos_bias="shared")
    with pytest.raises(KdforgeError, match="set student.num_classes instead"):
        _cnn(SMALL_RESNET[0], {**SMALL_RESNET[1], "num_classes": 3})


@pytest.mark.parametrize("name", ["fastvit_s12", "mobilevitv2_050"])
def test_papers_mobile_students_build_and_run(name):
    """papers/001's targets (FastViT-S12, MobileViT-V2) as timm students with a classifier."""
    start = time.perf_counter()
    s = _cnn(name, {}, num_classes=7).eval()
    built = time.perf_counter() - start
    if built > 5:
        pytest.skip(f"building {name} took {built:.1f} s on this machine (> 5 s budget for a unit test)")
    out = s(_images(b=1))
    assert out.grid == (2, 2) and out.patches.shape == (1, 4, s.embed_dim) and out.logits.shape == (1, 7)
    assert s.embed_dim == s.model.num_features


# ----------------------------------------------------------------------------------------------- timm student, ViTs
def _vit(**extra):
    torch.manual_seed(0)
    return create("students", {"plugin": "timm", "model": TINY_MODEL, "model_kwargs": dict(TINY_VIT), **extra},
                  "student")


def test_vit_student_without_classes_keeps_its_state_dict_keys():
    """Checkpoints of earlier runs must load: exactly the headless timm model's keys and the mask token."""
    s = _vit()
    bare = timm.create_model(TINY_MODEL, num_classes=0, **TINY_VIT)
    assert set(s.state_dict()) == {"mask_token"} | {f"model.{k}" for k in bare.state_dict()}
    assert s(torch.rand(2, 3, 16, 16)).logits is None


def test_vit_student_with_classes_gives_timm_head_logits_in_the_top_layer():
    s = _vit(num_classes=6).eval()
    x = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    out = s(x, mask=mask)
    assert out.logits.shape == (2, 6)
    # timm's classifier on the same (masked) features as the tokens: the final CLS token through the head
    torch.testing.assert_close(out.logits, s.model.head(out.cls))
    assert not torch.allclose(out.logits, s(x).logits)
    ids, depth = s.layer_ids()
    assert ids["model.head.weight"] == depth + 1 and ids["model.blocks.0.attn.qkv.weight"] == 1


# ----------------------------------------------------------------------------------------------- encoder student
def _encoder(teacher=None, **extra):
    torch.manual_seed(0)
    table = {"plugin": "encoder", "teacher": teacher or TINY_ENCODER_TEACHER, "num_classes": 3, **extra}
    return _build("students", table, "student")


def _same_teacher(student) -> TimmTeacher:
    """The wrapped foundation model on its own: a timm teacher with the student's backbone weights."""
    cfg = dict(TINY_ENCODER_TEACHER)
    cfg.pop("plugin")
    teacher = _build("teachers", {"plugin": "timm", **cfg, "autocast": "none"}, "teacher")
    teacher.model.load_state_dict(student.backbone.state_dict())
    return teacher


def test_encoder_linear_probe_reads_the_final_cls_token():
    s = _encoder().train()
    x = _images(b=3, size=32)
    out = s(x)
    ref = _same_teacher(s)(x)  # the teacher normalises with its model's statistics: so must the student
    assert out.grid == ref.grid == s.grid((32, 32)) == (4, 4) and s.embed_dim == 32 and s.patch_size == 8
    torch.testing.assert_close(out.cls, ref.cls)
    torch.testing.assert_close(out.patches, ref.patches)
    assert isinstance(s.head, nn.Linear) and s.head.in_features == 32
    torch.testing.assert_close(out.logits, s.head(ref.cls))
    assert out.logits.shape == (3, 3)


def test_encoder_mlp_head_reads_the_last_blocks_cls_tokens_and_the_pooled_patches():
    s = _encoder(head="mlp", blocks=2, pooled_patches=True).eval()
    x = _images(b=3, size=32)
    out = s(x)
    first, last = _same_teacher(s).intermediate_layers(x, 2)
    features = torch.cat([first.cls, last.cls, last.patches.mean(dim=1)], dim=-1)  # papers/002's n_in = 3 D
    lin1, act, lin2 = s.head
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (96, 96, 3) and isinstance(act, nn.GELU)
    torch.testing.assert_close(out.logits, s.head(features))
    torch.testing.assert_close(out.cls, last.cls)
    assert _encoder(head="mlp", mlp_hidden=7).head[0].out_features == 7


def test_encoder_probe_trains_only_the_head_and_keeps_the_backbone_in_eval_mode():
    s = _encoder(head="mlp").train()
    assert s.training and s.head.training and not s.backbone.training
    assert not any(m.training for m in s.backbone.modules())
    s.eval().train()
    assert not s.backbone.training
    grad_mode = []
    s.backbone.blocks[0].register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    out = s(_images(size=32))
    assert grad_mode == [False]  # the backbone ran without autograd: no activations kept for a backward
    assert out.cls.grad_fn is None and out.patches.grad_fn is None
    out.logits.logsumexp(-1).mean().backward()
    grads = {n for n, p in s.named_parameters() if p.grad is not None}
    assert grads == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    in_optimizer = {id(p) for g in param_groups(s, 0.05) for p in g["params"]}
    assert in_optimizer == {id(p) for p in s.head.parameters()}
    with pytest.raises(KdforgeError, match="only its head trains.*layer_decay = 1.0"):
        param_groups(s, 0.05, layer_decay=0.7)


def test_encoder_finetune_trains_the_backbone_with_layer_decay():
    s = _encoder(tune="all").train()
    assert s.backbone.training
    out = s(_images(size=32))
    (out.cls.square().mean() + out.logits.logsumexp(-1).mean()).backward()
    assert all(p.grad is not None for n, p in s.named_parameters() if not n.startswith("backbone.norm_pre"))
    model = nn.ModuleDict({"student": s})
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # depth 2: embeddings at 0.5^3, block 0 at 0.5^2, block 1 at 0.5, the final norm and the head at the full lr
    assert scale[id(named["student.backbone.patch_embed.proj.weight"])] == pytest.approx(0.125)
    assert scale[id(named["student.backbone.blocks.0.mlp.fc1.weight"])] == pytest.approx(0.25)
    assert scale[id(named["student.backbone.blocks.1.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert scale[id(named["student.backbone.norm.weight"])] == 1.0 and scale[id(named["student.head.weight"])] == 1.0


def test_encoder_on_a_cnn_teacher_reads_its_pooled_feature_map():
    name, kwargs = SMALL_RESNET
    teacher = {"plugin": "timm", "model": name, "model_kwargs": kwargs}
    s = _encoder(teacher=teacher, pooled_patches=True).eval()
    out = s(_images())
    assert out.grid == (2, 2) == s.grid((64, 64)) and s.embed_dim == 64 and out.logits.shape == (2, 3)
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))
    with pytest.raises(KdforgeError, match="blocks = 2 reads the CLS tokens.*set blocks = 1"):
        _encoder(teacher=teacher, blocks=2)
    with pytest.raises(KdforgeError, match="not one.*layer_decay = 1.0"):
        _encoder(teacher=teacher, tune="all").layer_ids()


def test_encoder_errors(hub_dir):
    s = _encoder()
    with pytest.raises(KdforgeError, match="takes no masked view"):
        s(_images(size=32), mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(KdforgeError, match="blocks = 3 but .* has 2 blocks"):
        _encoder(blocks=3)
    with pytest.raises(RecipeError, match="num_classes = 1 is out of range"):
        _encoder(num_classes=1)
    with pytest.raises(RecipeError, match="missing required key.*num_classes"):
        _build("students", {"plugin": "encoder", "teacher": TINY_ENCODER_TEACHER}, "student")
    with pytest.raises(RecipeError, match="mlp_hidden = 8 sizes the MLP head"):
        _encoder(mlp_hidden=8)
    with pytest.raises(RecipeError, match="teacher table with a plugin"):
        _encoder(teacher={"model": TINY_MODEL})
    hub = {"plugin": "torch_hub", "repo": str(hub_dir), "model": "dinov2_tiny", "source": "local", "pretrained": False}
    with pytest.raises(KdforgeError, match="adapts a timm model.*'torch_hub' holds .*TinyDino"):
        _encoder(teacher=hub)


def test_encoder_reports_the_code_its_teacher_would_run():
    table = {"plugin": "encoder", "num_classes": 3,
             "teacher": {**TINY_ENCODER_TEACHER, "checkpoint": "w.pt", "trust_pickle": True}}
    from kdforge.plugins import get_registry
    from kdforge.recipe.schema import build

    cfg = build(get_registry().get("students", "encoder", "student").Config,
                {k: v for k, v in table.items() if k != "plugin"}, "student")
    assert cfg.runs_code() == ["teacher: trust_pickle = true unpickles 'w.pt' (pickles can run code)"]


# ----------------------------------------------------------------------------------------------- adapted teacher
ADAPTATIONS = {
    "encoder-mlp": {"plugin": "encoder", "teacher": TINY_ENCODER_TEACHER, "num_classes": 4, "head": "mlp",
                    "blocks": 2},
    "timm-cnn": {"plugin": "timm", "model": SMALL_RESNET[0], "model_kwargs": SMALL_RESNET[1], "num_classes": 4},
}


@pytest.mark.parametrize("kind", list(ADAPTATIONS))
def test_adapted_teacher_serves_the_run_student_frozen_with_its_logits(kind, tmp_path):
    run = tmp_path / "adapt"
    student = write_adaptation_run(run, ADAPTATIONS[kind])
    teacher = _build("teachers", {"plugin": "adapted", "run": str(run), "autocast": "none"}, "teacher").train()
    x = _images(b=3, size=32)
    out, ref = teacher(x), student(x)
    torch.testing.assert_close(out.logits, ref.logits)  # the run's weights, not a fresh build's
    torch.testing.assert_close(out.cls, ref.cls)
    torch.testing.assert_close(out.patches, ref.patches)
    assert out.grid == ref.grid == teacher.grid((32, 32)) == student.grid((32, 32))
    assert (teacher.embed_dim, teacher.patch_size) == (student.embed_dim, student.patch_size)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert out.logits.dtype == torch.float32 and not out.logits.is_inference()
    # another checkpoint of the run, named explicitly
    (run / "last.pt").rename(run / "step_00000001.pt")
    other = _build("teachers", {"plugin": "adapted", "run": str(run), "checkpoint": str(run / "step_00000001.pt"),
                                "autocast": "none"}, "teacher")
    torch.testing.assert_close(other(x).logits, ref.logits)


def test_adapted_teacher_needs_a_finished_run_with_logits(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(KdforgeError, match=f"'{missing}'.*adaptation stage must run first"):
        _build("teachers", {"plugin": "adapted", "run": str(missing)}, "teacher")
    run = tmp_path / "adapt"
    write_adaptation_run(run, ADAPTATIONS["encoder-mlp"])
    (run / "last.pt").unlink()
    with pytest.raises(KdforgeError, match=f"checkpoint at '{run / 'last.pt'}'.*adaptation stage must run first"):
        _build("teachers", {"plugin": "adapted", "run": str(run)}, "teacher")
    headless = tmp_path / "headless"
    write_adaptation_run(headless, {"plugin": "timm", "model": SMALL_RESNET[0], "model_kwargs": SMALL_RESNET[1]})
    with pytest.raises(KdforgeError, match="gives no logits: the adaptation stage's student needs num_classes"):
        _build("teachers", {"plugin": "adapted", "run": str(headless)}, "teacher")
    with pytest.raises(RecipeError, match="run must name the directory"):
        _build("teachers", {"plugin": "adapted"}, "teacher")
