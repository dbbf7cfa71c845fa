"""Checkpoint import: each official format written from random weights loads back and reproduces the outputs."""
from __future__ import annotations

import argparse
import hashlib
import pickle

import pytest
import timm
import torch
from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.checkpoints import (
    FORMATS,
    LoadReport,
    convert_state_dict,
    detect_format,
    load_checkpoint,
    read_state_dict,
    save_state_dict,
)

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def vit(**kw) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 0, **kw})


def deit_distilled(**kw) -> nn.Module:
    return timm.create_model("deit_tiny_distilled_patch16_224", **{**TINY, "num_classes": 10, **kw})


def beit(shared: bool, **kw) -> nn.Module:
    args = dict(use_abs_pos_emb=False, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared,
                init_values=0.1, use_fc_norm=False, num_classes=0)
    return timm.create_model("beit_base_patch16_224", **{**TINY, **args, **kw})


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (incl. zero-initialised rel-pos tables, q/v biases, LayerScale) so a missed key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def images(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_features(a: nn.Module, b: nn.Module, size: int = 32) -> None:
    x = images(size=size)
    with torch.no_grad():
        fa, fb = a.eval().forward_features(x), b.eval().forward_features(x)
    assert fa.shape == fb.shape
    assert torch.allclose(fa, fb, atol=1e-5, rtol=1e-5)
    assert fa.abs().mean() > 0.1  # not a degenerate comparison


def mlp_head_sd(dims: list[int], last_affine: bool) -> dict[str, torch.Tensor]:
    """MoCo v3 `_build_mlp`: Linear(no bias)-BN-ReLU ... Linear(no bias)-BN(affine=False)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False),
                   nn.BatchNorm1d(dims[i + 1], affine=not last or last_affine)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).state_dict()


# ---------------------------------------------------------------------------------------------------- per format

@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module", "model_ema", "ddp"])
def test_timm_format_containers(tmp_path, wrap):
    src = randomize(vit(), 1)
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}},
        "model": {"model": sd, "epoch": 3},
        "module": {"module": sd},
        "model_ema": {"model_ema": sd, "epoch": 3},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    dst = vit()
    report = load_checkpoint(dst, path)
    assert isinstance(report, LoadReport)
    assert report.format == "timm" and report.dropped == [] and report.allowed_missing == []
    assert report.num_loaded == len(sd)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_features(src, dst)


def test_deit_distilled(tmp_path):
    src = randomize(deit_distilled(), 2)
    args = argparse.Namespace(model="deit_tiny_distilled_patch16_224", lr=5e-4)  # official files carry `args`
    path = tmp_path / "deit.pth"
    torch.save({"model": src.state_dict(), "optimizer": {}, "epoch": 299, "args": args}, path)
    dst = deit_distilled()
    report = load_checkpoint(dst, path)
    assert report.format == "deit"
    assert "state dict read from checkpoint['model']" in report.notes
    assert_same_features(src, dst)
    with torch.no_grad():  # distilled head too (eval: mean of the two heads)
        assert torch.allclose(src(images()), dst(images()), atol=1e-5)
    with pytest.raises(MimlabError, match="dist_token.*distilled"):  # into a plain ViT: clear error
        load_checkpoint(vit(num_classes=10), path)


def test_mae_pretrain_drops_decoder(tmp_path):
    src = randomize(vit(), 3)
    sd = dict(src.state_dict())
    dec = {"mask_token": torch.randn(1, 1, 16), "decoder_pos_embed": torch.randn(1, 17, 16)}
    dec.update({f"decoder_embed.{k}": v for k, v in nn.Linear(32, 16).state_dict().items()})
    block = timm.models.vision_transformer.Block(16, 2)
    dec.update({f"decoder_blocks.0.{k}": v for k, v in block.state_dict().items()})
    dec.update({f"decoder_norm.{k}": v for k, v in nn.LayerNorm(16).state_dict().items()})
    dec.update({f"decoder_pred.{k}": v for k, v in nn.Linear(16, 8 * 8 * 3).state_dict().items()})
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**sd, **dec}}, path)
    assert detect_format(read_state_dict(path)) == "mae"
    dst = vit()
    report = load_checkpoint(dst, path)
    assert report.format == "mae"
    assert sorted(report.dropped) == sorted(dec)
    assert_same_features(src, dst)


def test_mae_finetuned_fc_norm(tmp_path):
    src = randomize(vit(global_pool="avg", num_classes=10), 4)
    assert "fc_norm.weight" in src.state_dict() and "norm.weight" not in src.state_dict()
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = vit(global_pool="avg", num_classes=10)
    assert load_checkpoint(dst, path, fmt="mae").format == "mae"
    with torch.no_grad():
        assert torch.allclose(src(images()), dst(images()), atol=1e-5)
    with pytest.raises(MimlabError) as e:  # a token-pooling model has norm, not fc_norm
        load_checkpoint(vit(num_classes=10), path, fmt="mae")
    msg = str(e.value)
    assert "fc_norm.weight" in msg and "norm.weight" in msg and "global_pool='avg'" in msg and "\n" not in msg


def test_mocov3(tmp_path):
    src = randomize(vit(), 5)
    enc = dict(src.state_dict())
    head = mlp_head_sd([32, 64, 64, 16], last_affine=False)
    momentum = {**enc, **{f"head.{k}": v for k, v in head.items()}}
    pred = mlp_head_sd([16, 64, 16], last_affine=False)
    sd = {}
    sd.update({f"module.base_encoder.{k}": v for k, v in enc.items()})
    sd.update({f"module.base_encoder.head.{k}": v for k, v in head.items()})
    sd.update({f"module.momentum_encoder.{k}": torch.randn_like(v.float()) for k, v in momentum.items()})
    sd.update({f"module.predictor.{k}": v for k, v in pred.items()})
    path = tmp_path / "vit-b-300ep.pth.tar"  # the released MoCo v3 file name style
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {"state": {}}}, path)
    dst = vit()
    report = load_checkpoint(dst, path)
    assert report.format == "mocov3"
    assert sorted(report.dropped) == sorted(k for k in sd if not k.startswith("module.base_encoder.")
                                            or k.startswith("module.base_encoder.head."))
    assert any("projection MLP" in n for n in report.notes)
    assert_same_features(src, dst)


def simmim_file(tmp_path, src: nn.Module, name: str = "simmim.pth") -> tuple:
    """Official SimMIM ViT pretrain layout: BEiT-shaped encoder under `encoder.`, 1x1-conv decoder."""
    from timm.models.beit import gen_relative_position_index

    enc = dict(src.state_dict())
    assert "rel_pos_bias.relative_position_bias_table" in enc
    grid = src.patch_embed.grid_size
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    sd["encoder.mask_token"] = torch.randn(1, 1, 32)
    sd["encoder.rel_pos_bias.relative_position_index"] = gen_relative_position_index(grid)  # persistent upstream
    sd["decoder.0.weight"] = torch.randn(8 * 8 * 3, 32, 1, 1)
    sd["decoder.0.bias"] = torch.randn(8 * 8 * 3)
    path = tmp_path / name
    torch.save({"model": sd, "epoch": 799}, path)
    return path, sd


def test_simmim_shared_bias_copied_per_layer(tmp_path):
    src = randomize(beit(shared=True), 6)
    with torch.no_grad():  # a large bias so that a table not copied would change the features visibly
        src.rel_pos_bias.relative_position_bias_table.mul_(10)
    path, sd = simmim_file(tmp_path, src)
    assert detect_format(read_state_dict(path)) == "simmim"
    dst = beit(shared=False)
    report = load_checkpoint(dst, path)
    assert report.format == "simmim"
    assert sorted(report.dropped) == sorted(["decoder.0.weight", "decoder.0.bias", "encoder.mask_token",
                                             "encoder.rel_pos_bias.relative_position_index"])
    table = sd["encoder.rel_pos_bias.relative_position_bias_table"]
    for blk in dst.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table.detach(), table)
    assert torch.equal(dst.blocks[1].gamma_1.detach(), sd["encoder.blocks.1.gamma_1"])
    assert torch.equal(dst.blocks[0].attn.q_bias.detach(), sd["encoder.blocks.0.attn.q_bias"])
    assert_same_features(src, dst)


def test_simmim_into_shared_model(tmp_path):
    src = randomize(beit(shared=True), 7)
    path, _ = simmim_file(tmp_path, src)
    dst = beit(shared=True)
    load_checkpoint(dst, path, fmt="simmim")
    assert_same_features(src, dst)


def test_simmim_into_default_beit_fc_norm_hint(tmp_path):
    path, _ = simmim_file(tmp_path, randomize(beit(shared=True), 8))
    with pytest.raises(MimlabError, match="use_fc_norm=False"):
        load_checkpoint(beit(shared=False, use_fc_norm=None), path)


def test_simmim_resize_rel_pos_table(tmp_path):
    """Grid 4x4 -> 6x6: a per-head constant table stays constant, the 3 cls rows are kept."""
    src = randomize(beit(shared=True), 9)
    with torch.no_grad():
        t = src.rel_pos_bias.relative_position_bias_table  # (7*7+3, heads)
        t[:-3] = torch.tensor([1.5, -2.0])
        t[-3:] = torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    path, _ = simmim_file(tmp_path, src)
    dst = beit(shared=False, img_size=48)
    report = load_checkpoint(dst, path)
    assert any("7x7" not in n and "4x4 grid -> 6x6 grid" in n for n in report.notes), report.notes
    for blk in dst.blocks:
        new = blk.attn.relative_position_bias_table.detach()
        assert new.shape == (11 * 11 + 3, 2)
        assert torch.allclose(new[:-3], torch.tensor([1.5, -2.0]).expand(121, 2), atol=1e-5)
        assert torch.equal(new[-3:], t[-3:].detach())


def test_pos_embed_resize(tmp_path):
    src = randomize(vit(), 10)
    with torch.no_grad():
        src.pos_embed[:, 1:] = torch.linspace(-1, 1, 32)  # constant over the grid, per channel
    path = tmp_path / "w.pth"
    save_state_dict(src, path)
    dst = vit(img_size=48)
    with pytest.raises(MimlabError, match="pos_embed checkpoint .1, 17, 32. vs model .1, 37, 32.*--img-size"):
        load_checkpoint(dst, path)                               # resampling is never silent
    report = load_checkpoint(dst, path, resize_pos_embed=True)
    assert any("4x4 to a 6x6" in n for n in report.notes) and report.resized == ["pos_embed 4x4 -> 6x6"]
    pe = dst.pos_embed.detach()
    assert pe.shape == (1, 37, 32)
    assert torch.equal(pe[:, 0], src.pos_embed[:, 0].detach())
    assert torch.allclose(pe[0, 1:], torch.linspace(-1, 1, 32).expand(36, 32), atol=1e-5)


def test_layer_scale_rename(tmp_path):
    src = randomize(vit(init_values=0.1), 11)
    sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in src.state_dict().items()}
    assert "blocks.0.gamma_1" in sd
    path = tmp_path / "deit3.pth"
    torch.save({"model": sd}, path)
    dst = vit(init_values=0.1)
    load_checkpoint(dst, path)
    assert_same_features(src, dst)


# ------------------------------------------------------------------------------------------------------- strictness

def test_missing_unexpected_and_shape_errors_list_keys(tmp_path):
    src = randomize(vit(), 12)
    sd = dict(src.state_dict())
    missing = {k: sd.pop(k) for k in list(sd) if k.startswith("blocks.1.")}
    sd["foo.bar"] = torch.zeros(3)
    sd["norm.weight"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    dst = vit()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(MimlabError) as e:
        load_checkpoint(dst, path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "format timm" in msg
    assert f"{len(missing)} missing keys" in msg and "blocks.1.attn.qkv.weight" in msg
    assert "1 unexpected keys" in msg and "foo.bar" in msg
    assert "norm.weight checkpoint (7,) vs model (32,)" in msg
    assert "(+2 more)" in msg  # 12 missing, the first 10 listed
    after = dst.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded on failure


def test_drop_keys_and_allow_missing(tmp_path):
    with_head = randomize(vit(num_classes=10), 13)
    path = tmp_path / "head.pth"
    torch.save({"model": with_head.state_dict()}, path)
    with pytest.raises(MimlabError, match=r"2 unexpected keys.*head.bias, head.weight.*drop_keys"):
        load_checkpoint(vit(), path)
    dst = vit()
    report = load_checkpoint(dst, path, drop_keys=["head.*"])
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    assert_same_features(with_head, dst)

    headless = tmp_path / "headless.pth"
    save_state_dict(randomize(vit(), 14), headless)
    target = vit(num_classes=10)
    with pytest.raises(MimlabError, match=r"2 missing keys.*allow_missing"):
        load_checkpoint(target, headless)
    init_head = target.head.weight.detach().clone()
    report = load_checkpoint(target, headless, allow_missing="head.*")  # a str is one pattern
    assert sorted(report.allowed_missing) == ["head.bias", "head.weight"]
    assert torch.equal(target.head.weight.detach(), init_head)  # head keeps its initialisation
    assert torch.equal(target.cls_token.detach(), read_state_dict(headless)["cls_token"])


def test_explicit_format_mismatch(tmp_path):
    path = tmp_path / "w.pth"
    save_state_dict(vit(), path)
    for fmt, pat in [("simmim", "not a SimMIM checkpoint"), ("mocov3", "not a MoCo v3"), ("bogus", "unknown")]:
        with pytest.raises(MimlabError, match=pat):
            load_checkpoint(vit(), path, fmt=fmt)


def test_detect_format():
    t = torch.zeros(1)
    assert detect_format({"cls_token": t, "blocks.0.attn.qkv.weight": t}) == "timm"
    assert detect_format({"module.cls_token": t}) == "timm"
    assert detect_format({"cls_token": t, "dist_token": t}) == "deit"
    assert detect_format({"cls_token": t, "decoder_embed.weight": t, "mask_token": t}) == "mae"
    assert detect_format({"module.base_encoder.cls_token": t, "module.predictor.0.weight": t}) == "mocov3"
    assert detect_format({"encoder.blocks.0.gamma_1": t, "decoder.0.weight": t}) == "simmim"
    assert detect_format({"cls_token": t, "mask_token": t, "blocks.0.ls1.gamma": t}) == "dinov2"
    assert detect_format({"register_tokens": t, "cls_token": t}) == "dinov2"
    assert detect_format({"storage_tokens": t, "cls_token": t}) == "dinov3"
    assert detect_format({"visual.class_embedding": t, "token_embedding.weight": t}) == "openai-clip"
    assert detect_format({"class_embedding": t, "transformer.resblocks.0.ln_1.weight": t}) == "openai-clip"
    assert detect_format({"visual.trunk.pos_embed": t}) == "open-clip"
    assert set(FORMATS) == {"auto", "timm", "deit", "mae", "mocov3", "simmim", "dinov2", "dinov3", "openai-clip",
                            "open-clip"}


def test_convert_state_dict_reports_origin():
    src = beit(shared=True)
    sd = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    out, conv = convert_state_dict(sd, beit(shared=False))
    assert conv.format == "simmim"
    assert conv.origin["blocks.1.attn.relative_position_bias_table"] == \
        "encoder.rel_pos_bias.relative_position_bias_table"
    assert "rel_pos_bias.relative_position_bias_table" not in out


# ------------------------------------------------------------------------------------------------------ files / IO

def test_safetensors_round_trip_shared_and_strided(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base, "tied": base, "t": base.t(), "half": torch.randn(3).half()}
    path = tmp_path / "x.safetensors"
    save_state_dict(sd, path)
    back = read_state_dict(path)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # atomic: no temp file left

    src = randomize(vit(), 15)
    save_state_dict(src, tmp_path / "m.safetensors")
    dst = vit()
    assert load_checkpoint(dst, tmp_path / "m.safetensors").format == "timm"
    assert_same_features(src, dst)
    with pytest.raises(MimlabError, match=r"\.safetensors, \.pth"):
        save_state_dict(sd, tmp_path / "x.txt")


def test_half_checkpoint_cast_noted(tmp_path):
    src = randomize(vit(), 16)
    path = tmp_path / "h.pth"
    save_state_dict({k: v.half() for k, v in src.state_dict().items()}, path)
    dst = vit()
    report = load_checkpoint(dst, path)
    assert any("float16->float32" in n for n in report.notes)
    assert torch.equal(dst.cls_token.detach(), src.cls_token.detach().half().float())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_malicious_pickle_refused_without_executing(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    if how == "torch_save":
        torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(MimlabError) as e:
        load_checkpoint(vit(), path)
    msg = str(e.value)
    assert str(path) in msg and "not a weights-only checkpoint" in msg and "\n" not in msg
    if how == "torch_save":
        assert "system" in msg  # names the object it refused to build
    assert not marker.exists()


def test_bad_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    save_state_dict(vit(), good)
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    st = tmp_path / "good.safetensors"
    save_state_dict(vit(), st)
    (tmp_path / "trunc.safetensors").write_bytes(st.read_bytes()[:-100])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint at all" * 20)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    (tmp_path / "adir").mkdir()
    cases = {
        "trunc.pth": "truncated or corrupt", "trunc.safetensors": "truncated or corrupt", "empty.pth": "empty",
        "garbage.bin": "corrupt", "tensor.pth": "holds a Tensor", "list.pth": "holds a list",
        "meta.pth": "no state dict", "adir": "is a directory", "missing.pth": "does not exist",
    }
    for name, pat in cases.items():
        with pytest.raises(MimlabError) as e:
            read_state_dict(tmp_path / name)
        msg = str(e.value)
        assert pat in msg and str(tmp_path / name) in msg and "\n" not in msg, (name, msg)


def test_a_width_or_depth_mismatch_leads_with_one_diagnosis(tmp_path):
    import timm

    from mimlab.errors import MimlabError
    from mimlab.models.checkpoints import load_checkpoint

    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    f = tmp_path / "deit_tiny.pth"
    torch.save({"model": tiny.state_dict()}, f)
    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    with pytest.raises(MimlabError) as e:
        load_checkpoint(small, f)
    head = str(e.value).split(": ", 1)[1]
    assert head.startswith("checkpoint width 192, model width 384 (a ViT-Tiny checkpoint?): build the model"), head
    shallow = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                                depth=6)
    with pytest.raises(MimlabError, match="checkpoint depth 12 blocks, model 6: build the model"):
        load_checkpoint(shallow, f)
