"""Tests for the ViT encoder, DINOv2 weight loading, EMA teacher, DNP-ConFormer and the MIM warm-up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_dnprd.anomaly_map import AnomalyMapper
from monai_dnprd.losses import DNPLoss
from monai_dnprd.networks import (
    DNPConFormer,
    MIMHead,
    PrototypeAttentionBlock,
    PrototypeExtractor,
    ViTEncoder,
    default_groups,
    default_taps,
    ema_update,
    load_dinov2_weights,
    make_teacher,
    mim_loss,
    patchify,
    checkerboard_mask,
    hidden_index,
    inference_masks,
    put_tokens,
    random_checkerboard_mask,
    random_patch_mask,
    take_tokens,
)
from monai_dnprd.networks.vit import foreground_patches

TINY = dict(img_size=32, patch_size=8, vit="tiny", embed_dim=32, num_heads=2)


def tiny_model(depth: int = 4, **kw) -> DNPConFormer:
    torch.manual_seed(0)
    return DNPConFormer(**{**TINY, "depth": depth, **kw})


# ---------------------------------------------------------------------------------------------- taps / groups
def test_default_taps_and_groups():
    assert default_taps(12) == list(range(2, 10))
    assert default_taps(6) == [1, 2, 3, 4]
    assert default_taps(4) == [0, 1, 2, 3]
    assert default_taps(2) == [0, 1]
    for d in range(2, 25):
        t = default_taps(d)
        assert len(t) >= 2 and t == sorted(t) and 0 <= t[0] and t[-1] < d
    assert default_groups(8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert default_groups(3) == [[0], [1, 2]]
    with pytest.raises(ValueError):
        default_taps(1)
    with pytest.raises(ValueError):
        default_groups(1)


# ---------------------------------------------------------------------------------------------- encoder
def test_encoder_taps_and_mask():
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_register_tokens=4)
    assert enc.grid_size == (4, 4) and enc.num_prefix_tokens == 5
    x = torch.randn(2, 3, 32, 32)
    outs = enc(x, [3, 1])
    assert [o.shape for o in outs] == [torch.Size([2, 16, 32])] * 2
    assert torch.allclose(enc(x, [1])[0], outs[1])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 3] = True
    with torch.no_grad():
        enc.mask_token.normal_()
    assert not torch.allclose(enc(x, [0], mask=mask)[0], enc(x, [0])[0])
    # masked patch content no longer matters
    x2 = x.clone()
    x2[:, :, 0:8, 24:32] = 5.0  # patch index 3
    assert torch.allclose(enc(x, [3], mask=mask)[0], enc(x2, [3], mask=mask)[0], atol=1e-5)
    # a different input size interpolates the positional embedding
    assert enc(torch.randn(1, 3, 48, 40), [2])[0].shape == (1, 30, 32)
    names = dict(enc.named_parameters())
    for k in ["cls_token", "register_tokens", "mask_token", "pos_embed", "patch_embed.proj.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.3.mlp.fc2.weight", "norm.weight"]:
        assert k in names, k
    with pytest.raises(ValueError, match="multiple"):
        ViTEncoder(img_size=30, patch_size=8)


# ---------------------------------------------------------------------------------------------- DNP-ConFormer
@pytest.mark.parametrize("depth", [2, 4, 6])
def test_dnp_shapes(depth):
    m = tiny_model(depth)
    assert m.taps == default_taps(depth) and m.groups == default_groups(len(m.taps))
    assert len(m.decoder) == len(m.taps)
    out = m(torch.randn(3, 3, 32, 32))
    assert len(out.targets) == len(out.recons) == 2
    for t, r in zip(out.targets, out.recons):
        assert t.shape == r.shape == (3, 32, 4, 4)
        assert not t.requires_grad and r.requires_grad
    assert out.prototypes.shape == (3, 6, 32)
    assert out.tokens.shape == (3, 16, 32)
    assert out.assignments.shape == (3, 16) and out.assignments.dtype == torch.long
    assert int(out.assignments.max()) < 6


def test_checkerboard_masks():
    m = checkerboard_mask((4, 6), 2)
    assert m.reshape(4, 6).tolist()[0] == [True, True, False, False, True, True]
    both = inference_masks((5, 7), 2)
    assert both.shape == (2, 35) and torch.equal(both.sum(0), torch.ones(35, dtype=torch.long))  # each token once
    r = random_checkerboard_mask(64, (16, 16), 2, generator=torch.Generator().manual_seed(0))
    assert r.shape == (64, 256) and torch.allclose(r.float().mean(1), torch.full((64,), 0.5), atol=0.07)
    assert len({tuple(row.tolist()) for row in r}) > 4  # random offsets and parities
    with pytest.raises(ValueError):
        checkerboard_mask((4, 4), 0)


def test_context_only_reconstruction_never_reads_the_token_itself():
    """At inference every token is rebuilt from a pass that hid it: changing a patch's pixels leaves that token's
    reconstruction exactly as it was (an anomaly cannot be copied), while the teacher's target moves."""
    m = tiny_model(4, mask_block=1).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 8:16, 16:24] += 3.0  # token (1, 2) of the 4 x 4 grid
    with torch.no_grad():
        a, b = m(x), m(y)
    for ta, tb, ra, rb in zip(a.targets, b.targets, a.recons, b.recons):
        torch.testing.assert_close(ra[..., 1, 2], rb[..., 1, 2], rtol=0, atol=1e-5)
        assert (ta[..., 1, 2] - tb[..., 1, 2]).abs().max() > 1e-3
        assert (ra - rb).abs().max() > 1e-6  # the other pass did read it, for other tokens
    torch.testing.assert_close(a.pixels[:, 6], b.pixels[:, 6], rtol=0, atol=1e-5)  # token (1, 2): 1 * 4 + 2
    assert (a.pixel_targets[:, 6] - b.pixel_targets[:, 6]).abs().max() > 1.0


def test_hidden_tokens_carry_their_foreground_shape_never_their_intensities():
    """A hidden token knows which of its pixels are background (exactly 0 after normalisation), nothing else:
    rescaling the patch's tissue leaves its reconstruction as it was, moving the brain's edge through it does not."""
    m = tiny_model(4, mask_block=1).eval()
    with torch.no_grad():
        m.encoder.foreground_embed.normal_()
    x = torch.rand(1, 3, 32, 32) + 0.1
    x[..., :, :12] = 0.0  # background on the left: the edge runs through tokens (r, 1)
    brighter, edge_moved = x.clone(), x.clone()
    brighter[..., 8:16, 8:16] = torch.where(x[..., 8:16, 8:16] != 0, 2.0 * x[..., 8:16, 8:16] + 1.0, 0.0)
    edge_moved[..., 8:16, 12:14] = 0.0
    with torch.no_grad():
        a, b, c = m(x), m(brighter), m(edge_moved)
    for ra, rb, rc in zip(a.recons, b.recons, c.recons):
        torch.testing.assert_close(ra[..., 1, 1], rb[..., 1, 1], rtol=0, atol=1e-5)
        assert (ra[..., 1, 1] - rc[..., 1, 1]).abs().max() > 1e-3
    assert torch.equal(foreground_patches(x, 8)[0, 5].reshape(8, 8)[:, :4], torch.zeros(8, 4, dtype=torch.bool))


def test_foreground_embedding_starts_at_zero_and_draws_nothing():
    """The option changes nothing at initialisation (same weights, same outputs, same random state after), and
    models exported before it load without it."""
    outs, draws = [], []
    for on in (False, True):
        m = tiny_model(4, hidden_foreground=on).eval()
        draws.append(torch.rand(1))
        with torch.no_grad():
            outs.append(m(torch.rand(1, 3, 32, 32)))
    assert torch.equal(draws[0], draws[1])
    for r0, r1 in zip(outs[0].recons, outs[1].recons):
        assert torch.equal(r0, r1)
    old = {"network": {k: v for k, v in tiny_model(4).config().items() if k != "hidden_foreground"}}
    assert AnomalyMapper.from_config(old).network.encoder.foreground_embed is None


def test_training_pass_hides_the_masked_tokens_and_prototypes_read_the_visible_ones():
    m = tiny_model(4, mask_block=1)
    hide = checkerboard_mask((4, 4), 1)[None]
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 0:8, 0:8] += 3.0  # token (0, 0): hidden by this mask
    m.eval()
    with torch.no_grad():
        a, b = m(x, mask=hide), m(y, mask=hide)
    torch.testing.assert_close(a.prototypes, b.prototypes)
    for ra, rb in zip(a.recons, b.recons):
        torch.testing.assert_close(ra, rb)
    assert torch.equal(a.hidden, hide)


def test_hidden_index_takes_each_rows_hidden_tokens_and_put_tokens_puts_them_back():
    mask = torch.tensor([[True, False, True, False, True], [False, False, True, False, False]])
    idx = hidden_index(mask)
    assert idx.tolist()[0] == [0, 2, 4] and idx.tolist()[1][0] == 2  # row 1 filled up with visible tokens
    t = torch.randn(2, 5, 3)
    back = put_tokens(take_tokens(t, idx), idx, 5)
    picked = torch.zeros(2, 5, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(back[picked], t[picked]) and not back[~picked].any()


@pytest.mark.parametrize("training", [False, True])
def test_outside_training_only_the_hidden_tokens_are_decoded_and_no_value_changes(training):
    """The decoder and the pixel head treat tokens one by one, so decoding the hidden tokens alone (outside
    training) gives the very values a full decode gives there, and 0 at the visible tokens; training decodes every
    token, as before (the same dropout draws and gradient sums)."""
    m = tiny_model(4, mask_block=1).train(training)
    with torch.no_grad():
        for p in m.parameters():  # a decoder far from its near-zero init, so that every token's output differs
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    hide = random_checkerboard_mask(2, (4, 4), 1, generator=torch.Generator().manual_seed(0))
    last = len(m.encoder.blocks) - 1
    with torch.no_grad():
        feats = m.encoder(x, [*m.taps, last], mask=hide)
        f = torch.stack(feats[:-1]).mean(0)
        protos = m.extractor(f, ~hide)
        torch.manual_seed(1)
        full = m.reconstruct(f, protos, (4, 4))
        torch.manual_seed(1)
        out = m(x, mask=hide)
        pixels = m.pixel_head(m.encoder.norm(feats[-1]))
    if training:
        for a, c in zip(full, out.recons):
            assert torch.equal(a, c)
        assert torch.equal(out.pixels, pixels)
        return
    part = m.reconstruct(f, protos, (4, 4), hidden_index(hide))
    grid_hide = hide.reshape(2, 1, 4, 4).expand_as(full[0])
    for a, b, c in zip(full, part, out.recons):
        assert torch.equal(a[grid_hide], b[grid_hide]) and torch.equal(b, c)
        assert not b[~grid_hide].any() and (a[~grid_hide] != 0).all()
    torch.testing.assert_close(out.pixels[hide], pixels[hide], rtol=0, atol=1e-6)
    assert not out.pixels[~hide].any()


def test_dnp_invalid_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DNPConFormer(**{**TINY, "img_size": 30, "depth": 2})
    m = tiny_model(2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError):
        DNPConFormer(**{**TINY, "depth": 4, "groups": [[0, 1], [1, 2]]})
    with pytest.raises(ValueError, match="mask_block must be >= 1"):  # context-only decoding is the method
        DNPConFormer(**{**TINY, "depth": 2, "mask_block": 0})
    with pytest.raises(ValueError, match="too small for mask_block 3"):  # a 4x4 grid cannot hold 3x3 blocks
        DNPConFormer(**{**TINY, "depth": 2, "mask_block": 3})


def test_gradients_reach_trainable_parts_not_teacher():
    m = tiny_model(4)
    loss = DNPLoss()(m(torch.randn(2, 3, 32, 32)))["loss"]
    loss.backward()
    for name, part in [("encoder", m.encoder.blocks[0]), ("extractor", m.extractor), ("bottleneck", m.bottleneck),
                       ("decoder", m.decoder)]:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert m.extractor.prototypes.grad is not None and m.extractor.prototypes.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    groups = m.param_groups()
    assert set(groups) == {"encoder", "decoder", "pixel_head"}
    ids = {id(p) for ps in groups.values() for p in ps}
    assert not ids & {id(p) for p in m.teacher.parameters()}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert ids == trainable
    m.train()
    assert m.encoder.training and not m.teacher.training


def test_update_teacher_ema_formula():
    m = tiny_model(2, ema_beta=0.9)
    for p in m.encoder.parameters():  # move the student away from the teacher
        p.data.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    student = m.encoder.state_dict()
    m.update_teacher()
    for k, v in m.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student[k], rtol=1e-6, atol=1e-6)


def test_ema_update_copies_buffers_and_make_teacher():
    s = nn.BatchNorm1d(3)
    s.running_mean.fill_(2.0)
    t = make_teacher(nn.BatchNorm1d(3))
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with torch.no_grad():
        s.weight.fill_(3.0)
    ema_update(t, s, 0.5)
    assert torch.allclose(t.running_mean, torch.full((3,), 2.0))
    assert torch.allclose(t.weight, torch.full((3,), 2.0))  # 0.5 * 1 + 0.5 * 3


def test_state_dict_round_trip():
    m = tiny_model(4)
    m.update_teacher()
    sd = m.state_dict()
    assert any(k.startswith("teacher.") for k in sd) and any(k.startswith("encoder.") for k in sd)
    m2 = DNPConFormer(**m.config())
    m2.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    m.eval(), m2.eval()
    o1, o2 = m(x), m2(x)
    for a, b in zip(o1.recons + o1.targets, o2.recons + o2.targets):
        assert torch.equal(a, b)


def test_from_scratch_init_trains():
    m = tiny_model(4)
    crit = DNPLoss()
    x = torch.rand(4, 3, 32, 32)
    opt = torch.optim.SGD([p for ps in m.param_groups().values() for p in ps], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = crit(m(x))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------------------- DNP blocks
def test_prototype_attention_no_softmax_and_learnable_scale():
    torch.manual_seed(0)
    blk = PrototypeAttentionBlock(16, num_heads=2)
    assert isinstance(blk.scale, nn.Parameter) and blk.scale.shape == (2, 1, 1)
    assert torch.all(blk.scale == 1)
    x, p = torch.randn(2, 10, 16), torch.randn(2, 6, 16)
    w, _ = blk.attention_weights(x, p)
    assert w.shape == (2, 2, 10, 6)
    assert (w == 0).any()  # ReLU of negative cosines: exact zeros, impossible with softmax
    assert not torch.allclose(w.sum(-1), torch.ones(2, 2, 10))
    assert (w <= 1 + 1e-6).all()  # |cos| <= 1 with s_h = 1
    with torch.no_grad():
        blk.scale.fill_(2.0)
    torch.testing.assert_close(blk.attention_weights(x, p)[0], 2 * w)
    blk(x, p).sum().backward()
    assert blk.scale.grad is not None and blk.scale.grad.abs().sum() > 0


def test_prototype_attention_has_no_residual_around_attention():
    torch.manual_seed(0)
    blk = PrototypeAttentionBlock(16, num_heads=2)
    with torch.no_grad():  # attention output 0 and MLP output 0 -> block output must be 0 whatever x is
        blk.proj.weight.zero_()
        blk.mlp.fc2.weight.zero_()
    assert torch.allclose(blk(torch.randn(1, 5, 16), torch.randn(1, 3, 16)), torch.zeros(1, 5, 16))


def test_prototype_extractor_shape_and_residual():
    torch.manual_seed(0)
    ext = PrototypeExtractor(16, num_prototypes=5, num_heads=2)
    out = ext(torch.randn(3, 20, 16))
    assert out.shape == (3, 5, 16)
    with torch.no_grad():
        ext.proj.weight.zero_()
        ext.mlp.fc2.weight.zero_()
    torch.testing.assert_close(ext(torch.randn(3, 20, 16)), ext.prototypes.expand(3, -1, -1))


# ---------------------------------------------------------------------------------------------- DINOv2 loading
def official_vits14(depth: int = 12, registers: bool = True, dim: int = 384, grid: int = 37) -> dict:
    """Synthetic state dict with the official DINOv2 ViT-S/14(-reg) key names and shapes."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, 14, 14),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": r(dim),
        "norm.bias": r(dim),
    }
    if registers:
        sd["register_tokens"] = r(1, 4, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim) * 0.02, b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim) * 0.02, b + "attn.proj.bias": r(dim),
            b + "ls1.gamma": r(dim),
            b + "norm2.weight": r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim) * 0.02, b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim) * 0.02, b + "mlp.fc2.bias": r(dim),
            b + "ls2.gamma": r(dim),
        })
    return sd


def vits14_encoder(depth: int = 12, **kw) -> ViTEncoder:
    args = dict(img_size=224, patch_size=14, embed_dim=384, depth=depth, num_heads=6, num_register_tokens=4,
                layerscale_init=1.0)
    return ViTEncoder(**{**args, **kw})


def check_loaded(enc: ViTEncoder, sd: dict) -> None:
    own = enc.state_dict()
    for k, v in sd.items():
        if k == "pos_embed":
            assert torch.equal(own[k][:, :1], v[:, :1])
            grid = v[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
            ref = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
            torch.testing.assert_close(own[k][:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 384))
        else:
            assert torch.equal(own[k], v), k


def test_load_dinov2_pth_wrapped_and_prefixed(tmp_path):
    sd = official_vits14()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}, "iteration": 5}, path)
    enc = vits14_encoder()
    assert enc.grid_size == (16, 16)
    assert load_dinov2_weights(enc, path) == []
    check_loaded(enc, sd)
    assert enc(torch.randn(1, 3, 224, 224), [11])[0].shape == (1, 256, 384)


def test_load_dinov2_safetensors_and_module_prefix(tmp_path):
    from safetensors.torch import save_file

    sd = official_vits14(depth=2)
    path = tmp_path / "w.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in sd.items()}, str(path))
    enc = vits14_encoder(depth=2)
    assert load_dinov2_weights(enc, path) == []
    check_loaded(enc, sd)


def test_load_dinov2_without_registers_and_in_channels(tmp_path):
    sd = official_vits14(depth=2, registers=False)
    path = tmp_path / "w.pt"
    torch.save({"model": sd}, path)
    enc = vits14_encoder(depth=2, in_channels=1)
    assert load_dinov2_weights(enc, path) == ["missing: register_tokens"]
    w = sd["patch_embed.proj.weight"]
    torch.testing.assert_close(enc.patch_embed.proj.weight, w.sum(1, keepdim=True))
    enc5 = vits14_encoder(depth=2, in_channels=5, num_register_tokens=0)
    assert load_dinov2_weights(enc5, path) == []
    torch.testing.assert_close(enc5.patch_embed.proj.weight, w.mean(1, keepdim=True).repeat(1, 5, 1, 1) * 0.6)
    # a constant image gives the same patch embedding whatever the channel count
    ref = F.conv2d(torch.ones(1, 3, 14, 14), w, sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    torch.testing.assert_close(enc5.patch_embed(torch.ones(1, 5, 14, 14)), ref, rtol=1e-4, atol=1e-4)


def test_load_dinov2_folds_layerscale_into_encoder_without_it(tmp_path):
    torch.manual_seed(0)
    src = ViTEncoder(img_size=28, patch_size=14, embed_dim=384, depth=2, num_heads=6, layerscale_init=1.0)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.1, 2.0)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = ViTEncoder(img_size=28, patch_size=14, embed_dim=384, depth=2, num_heads=6, layerscale_init=None)
    assert load_dinov2_weights(dst, path) == []
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(dst(x, [1])[0], src(x, [1])[0], rtol=1e-4, atol=1e-4)


class _Custom:
    pass


def test_load_dinov2_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": official_vits14(depth=1), "args": _Custom()}, path)
    with pytest.raises(ValueError, match="pickled") as err:
        load_dinov2_weights(vits14_encoder(depth=1), path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_dinov2_shape_mismatch(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(official_vits14(depth=1), path)
    enc = ViTEncoder(img_size=224, patch_size=14, embed_dim=192, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="does not match"):
        load_dinov2_weights(enc, path)


def test_dnp_pretrained_loads_student_and_teacher(tmp_path):
    torch.manual_seed(1)
    src = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, layerscale_init=1.0)
    path = tmp_path / "small.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    m = DNPConFormer(**{**TINY, "depth": 2, "pretrained": str(path)})
    for k, v in src.state_dict().items():
        assert torch.equal(m.encoder.state_dict()[k], v)
        assert torch.equal(m.teacher.state_dict()[k], v)
    assert m.pretrained == str(path) and m.config()["pretrained"] is None  # rebuild from config + state dict
    m2 = DNPConFormer(**m.config())
    m2.load_state_dict(m.state_dict())


def test_load_dinov2_training_checkpoint_uses_teacher(tmp_path):
    t, s = official_vits14(depth=1), official_vits14(depth=1, grid=16)
    path = tmp_path / "train.pth"
    model = {**{"teacher.backbone." + k: v for k, v in t.items()}, **{"student.backbone." + k: v for k, v in s.items()}}
    torch.save({"model": model, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    enc = vits14_encoder(depth=1)
    assert load_dinov2_weights(enc, path) == []
    check_loaded(enc, t)


# ---------------------------------------------------------------------------------------------- MIM
def test_mim_loss_decreases():
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    head = MIMHead(32, 8, 3)
    x = torch.rand(4, 3, 32, 32)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = mim_loss(enc, head, x, 0.6, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.isfinite(mim_loss(enc, head, x, 0.5, normalize_target=True))


def test_mim_loss_only_masked_patches():
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=16, patch_size=8, in_channels=1, embed_dim=16, depth=1, num_heads=2)
    head = MIMHead(16, 8, 1)
    with torch.no_grad():  # predict 0 everywhere: the loss is then the mean |pixel| of the masked patches
        head.proj.weight.zero_()
        head.proj.bias.zero_()
    x = torch.rand(1, 1, 16, 16)
    mask = random_patch_mask(1, 4, 0.5, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (1, 4) and int(mask.sum()) == 2
    expected = (patchify(x, 8).abs().mean(-1) * mask).sum() / 2
    torch.testing.assert_close(mim_loss(enc, head, x, 0.5, generator=torch.Generator().manual_seed(3)), expected)
    # patchify follows the encoder's row-major token order
    img = torch.arange(256.0).reshape(1, 1, 16, 16)
    assert torch.equal(patchify(img, 8)[0, 1], img[0, 0, :8, 8:].reshape(-1))
