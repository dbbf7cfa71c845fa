"""SimMIM / MAE / supervised wrappers: values checked against hand-worked or independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from mimlab.errors import MimlabError
from mimlab.pretrain.mae import MAE, norm_pix_target, patchify, sincos_2d
from mimlab.pretrain.masking import MaskGeometry
from mimlab.pretrain.simmim import SimMIM, masked_l1
from mimlab.pretrain.supervised import SupervisedLoss, soft_cross_entropy

VIT = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
BEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, use_shared_rel_pos_bias=True,
            use_abs_pos_emb=False, init_values=0.1)  # the official SimMIM ViT shape
SWIN = dict(img_size=64, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


pytestmark = pytest.mark.usefixtures("one_thread")


def vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**VIT, **kw})


def test_masked_l1_counts_only_masked_pixels_hand_worked():
    target = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]], [[0.5, 0.0], [-1.0, 2.0]]]])  # (1, 2, 2, 2)
    pred = torch.zeros_like(target)
    mask = torch.tensor([[[[1, 0], [0, 1]]]])                                         # (1, 1, 2, 2)
    # masked pixels (0,0) and (1,1): (|1| + |0.5| + |4| + |2|) / (2 pixels * 2 channels) = 7.5 / 4
    assert masked_l1(pred, target, mask).item() == pytest.approx(1.875)
    changed = target.clone()
    changed[:, :, 0, 1] = 100.0
    changed[:, :, 1, 0] = -100.0                                                      # visible pixels only
    assert masked_l1(pred, changed, mask).item() == pytest.approx(1.875)


def test_simmim_vit_mask_token_replaces_embeddings_before_position_and_loss_is_independent():
    enc = vit()
    model = SimMIM(enc)
    x = torch.randn(2, 3, 16, 16)
    geom = MaskGeometry((16, 16), 4, 8, 0.6)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([geom.sample(rng) for _ in range(2)]))           # (2, 4, 4)
    seen = {}
    enc.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach()))
    model.decoder.register_forward_hook(lambda m, a, o: seen.__setitem__("pred", o.detach()))
    loss, _ = model(x, mask)
    with torch.no_grad():
        pe = enc.patch_embed(x)                                                        # (2, 16, 32)
    flat = mask.flatten(1).bool()
    expect = torch.where(flat[..., None], model.mask_token.detach().expand_as(pe), pe) + enc.pos_embed[:, 1:].detach()
    torch.testing.assert_close(seen["in"][:, 1:], expect)
    torch.testing.assert_close(seen["in"][:, 0], (enc.cls_token[0, 0] + enc.pos_embed[0, 0]).detach().expand(2, -1))
    # independent loss: mean |pred - x| over masked pixels and channels (numpy, float64)
    pm = np.kron(mask.numpy(), np.ones((4, 4)))[:, None].repeat(3, 1).astype(bool)    # (2, 3, 16, 16)
    diff = np.abs(seen["pred"].double().numpy() - x.double().numpy())
    assert loss.item() == pytest.approx(diff[pm].mean(), rel=1e-5)
    assert seen["pred"].shape == x.shape
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_simmim_beit_and_swin_geometry_and_gradients():
    torch.manual_seed(0)
    beit = SimMIM(timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **BEIT))
    assert (beit.geom["stride"], beit.geom["token_grid"], beit.geom["num_prefix_tokens"]) == (8, (4, 4), 1)
    swin_enc = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **SWIN)
    swin = SimMIM(swin_enc)
    assert (swin.geom["stride"], swin.geom["token_grid"], swin.geom["patch_size"]) == (32, (16, 16), 4)
    v2 = SimMIM(timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=0, **SWIN))
    assert v2.geom["stride"] == 32 and v2.geom["out_dim"] == 128
    # Swin is NHWC: the mask token replaces the (normalised) patch embedding before the first stage
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16, dtype=torch.uint8)
    mask[:, :8] = 1
    seen = {}
    swin_enc.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach()))
    loss, _ = swin(x, mask)
    tok = swin.mask_token.detach().view(-1)
    assert torch.equal(seen["in"][:, :8], tok.expand(2, 8, 16, 16))
    torch.testing.assert_close(seen["in"][:, 8:], swin_enc.patch_embed(x)[:, 8:].detach())
    for model, size in ((beit, 32), (swin, 64), (v2, 64)):
        g = model.geom["token_grid"]
        m = (torch.rand(2, *g) < 0.5).to(torch.uint8)
        loss, _ = model(torch.randn(2, 3, size, size), m)
        loss.backward()
        assert torch.isfinite(loss) and model.mask_token.grad.abs().sum() > 0
    with pytest.raises(MimlabError, match="token grid"):
        swin(x, torch.zeros(2, 8, 8, dtype=torch.uint8))


def test_simmim_swin_official_geometry_at_192():
    enc = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=192,
                            window_size=6, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    g = SimMIM(enc).geom
    assert (g["patch_size"], g["token_grid"], g["stride"]) == (4, (48, 48), 32)
    geom = MaskGeometry((192, 192), 4, 32, 0.6)
    assert geom.cells == (6, 6) and geom.num_masked == 22 and geom.scale == 8


def test_simmim_rejects_unsupported_encoders():
    with pytest.raises(MimlabError, match="supports timm VisionTransformer"):
        SimMIM(timm.create_model("resnet18", pretrained=False, num_classes=0))
    with pytest.raises(MimlabError, match="patch_drop_rate=0"):
        SimMIM(vit(patch_drop_rate=0.5))


def test_mae_encoder_sees_only_visible_tokens_and_decoder_unshuffles():
    enc = vit()
    model = MAE(enc, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert model.keep == 4 and model.num_tokens == 16
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    seen = {}
    enc.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("enc", a[0].detach()))
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("dec", a[0].detach()))
    enc.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("latent", o.detach()))
    model.decoder_pred.register_forward_hook(lambda m, a, o: seen.__setitem__("pred", o.detach()))
    loss, _ = model(x, noise)
    assert seen["enc"].shape == (2, 1 + 4, 32)                                         # cls + 4 visible patches
    with torch.no_grad():
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        kept = torch.argsort(noise, dim=1)[:, :4]
        for b in range(2):
            torch.testing.assert_close(seen["enc"][b, 1:], tokens[b, kept[b]])
        torch.testing.assert_close(seen["enc"][:, 0], (enc.cls_token[0, 0] + enc.pos_embed[0, 0]).expand(2, -1))
        # decoder input in the original order: visible slots hold their embedded latents, the rest the mask token
        emb = model.decoder_embed(seen["latent"])
        pos = model.decoder_pos_embed
        for b in range(2):
            for j, t in enumerate(kept[b].tolist()):
                torch.testing.assert_close(seen["dec"][b, 1 + t], emb[b, 1 + j] + pos[0, 1 + t])
            for t in set(range(16)) - set(kept[b].tolist()):
                torch.testing.assert_close(seen["dec"][b, 1 + t], model.mask_token[0, 0] + pos[0, 1 + t])
    # loss: per-patch normalised pixels (unbiased var, eps 1e-6), MSE averaged over removed patches only
    xp = x.double().numpy().reshape(2, 3, 4, 4, 4, 4).transpose(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)
    tgt = (xp - xp.mean(-1, keepdims=True)) / np.sqrt(xp.var(-1, ddof=1, keepdims=True) + 1e-6)
    per = ((seen["pred"].double().numpy() - tgt) ** 2).mean(-1)
    removed = np.ones((2, 16), bool)
    for b in range(2):
        removed[b, kept[b].numpy()] = False
    assert loss.item() == pytest.approx(per[removed].mean(), rel=1e-5)


def test_mae_pieces():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item(), x[0, 2, 0, 2].item()]
    t = norm_pix_target(torch.tensor([[[1.0, 2.0, 3.0]]]))
    assert t.flatten().tolist() == pytest.approx([-1 / (1 + 1e-6) ** 0.5, 0, 1 / (1 + 1e-6) ** 0.5])
    pe = sincos_2d(2, 3, 8)
    assert pe.shape == (6, 8)
    assert pe[4].tolist() == pytest.approx([np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01),
                                            np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)], abs=1e-6)
    assert pe[5, 0] == pytest.approx(np.sin(2)) and pe[5, 4] == pytest.approx(np.sin(1))
    with pytest.raises(MimlabError, match="VisionTransformer"):
        MAE(timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **BEIT))


def test_supervised_loss_values():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    net = lambda x: logits  # noqa: E731
    loss, logs = SupervisedLoss(3, label_smoothing=0.1)(net, {"image": None, "label": y})
    logp = torch.log_softmax(logits, -1)
    soft = torch.full((2, 3), 0.1 / 3)
    soft[0, 0] += 0.9
    soft[1, 2] += 0.9
    assert loss.item() == pytest.approx(-(soft * logp).sum(1).mean().item(), rel=1e-6)
    assert logs["acc"].item() == 0.5
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(loss.item(), rel=1e-6)


def test_supervised_mixup_targets_are_soft_and_mixed():
    import numpy as np

    np.random.seed(0)
    x = torch.zeros(4, 3, 8, 8)
    x[:2] = 1.0
    y = torch.tensor([0, 0, 1, 1])
    seen = {}

    def net(inp):
        seen["x"] = inp
        return torch.zeros(inp.shape[0], 2)

    loss, _ = SupervisedLoss(2, label_smoothing=0.0, mixup=1.0)(net, {"image": x, "label": y})
    # uniform logits: CE = log 2 whatever the (soft) targets; the images are mixed with the flipped batch
    assert loss.item() == pytest.approx(float(np.log(2)), rel=1e-6)
    lam = float(seen["x"][0, 0, 0, 0])
    assert 0 < lam < 1 and torch.allclose(seen["x"][3], torch.full((3, 8, 8), 1 - lam))
    with pytest.raises(MimlabError, match="even"):
        SupervisedLoss(2, mixup=1.0)(net, {"image": x[:3], "label": y[:3]})
