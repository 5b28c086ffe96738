"""The shared ViT and MAE: shapes, masking invariants, equality with timm, and the loss."""

import pytest
import timm
import torch

from mae import MAE, VIT_SIZES, Attention, ViT, encoder_state_dict, sincos_pos_embed


def tiny_mae(**kwargs):
    config = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_dim=32, decoder_depth=1,
                  decoder_heads=4)
    return MAE(**{**config, **kwargs})


@pytest.mark.parametrize('name', sorted(VIT_SIZES))
def test_shapes_every_size(name):
    patch = 14 if name == 'vit_huge' else 16
    with torch.device('meta'):  # shapes only: no memory, no compute
        model = MAE(img_size=224, patch_size=patch, **VIT_SIZES[name])
        imgs = torch.empty(2, 3, 224, 224)
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
        loss, pred, mask = model(imgs)
    L, D = (224 // patch) ** 2, VIT_SIZES[name]['embed_dim']
    assert latent.shape == (2, 1 + int(L * 0.25), D)
    assert pred.shape == (2, L, patch * patch * 3)
    assert mask.shape == ids_restore.shape == (2, L)
    assert loss.shape == ()


@pytest.mark.parametrize('img_size,patch_size', [(64, 8), (48, 16), (224, 14)])
def test_any_image_size_divisible_by_patch(img_size, patch_size):
    model = tiny_mae(img_size=img_size, patch_size=patch_size)
    imgs = torch.randn(2, 3, img_size, img_size)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, (img_size // patch_size) ** 2, patch_size ** 2 * 3)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_image_size_not_divisible_is_refused():
    with pytest.raises(ValueError, match='not divisible'):
        tiny_mae(img_size=30, patch_size=8)


@pytest.mark.parametrize('mask_ratio', [0.75, 0.5, 0.9])
def test_masking_keeps_exactly_k_and_restores_order(mask_ratio):
    model = tiny_mae(img_size=64)
    B, L, D = 4, model.num_patches, 5
    x = torch.randn(B, L, D)
    x_visible, mask, ids_restore = model.random_masking(x, mask_ratio)
    K = int(L * (1 - mask_ratio))
    assert x_visible.shape == (B, K, D)
    assert torch.equal(mask.sum(dim=1), torch.full((B,), float(L - K)))
    # The visible tokens are exactly the rows of x where mask == 0, in some order.
    for b in range(B):
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept, dim=0).values, torch.sort(x_visible[b], dim=0).values)
    # ids_restore undoes the shuffle: visible tokens followed by placeholders, gathered, land where they came from.
    shuffled = torch.cat([x_visible, torch.zeros(B, L - K, D)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(restored, x * (1 - mask).unsqueeze(-1))


def test_noise_makes_masking_deterministic():
    model = tiny_mae()
    x = torch.randn(3, model.num_patches, 8)
    noise = torch.rand(3, model.num_patches)
    first, second = model.random_masking(x, 0.75, noise), model.random_masking(x, 0.75, noise)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The smallest noise values are the kept tokens (the official and HF ViTMAE convention).
    kept = noise.argsort(dim=1)[:, :int(model.num_patches * 0.25)]
    assert torch.all(torch.gather(first[1], 1, kept) == 0)


def test_sincos_position_embedding_layout():
    dim, h, w = 16, 3, 5
    pos = sincos_pos_embed(dim, h, w)[0]
    assert pos.shape == (1 + h * w, dim)
    assert torch.all(pos[0] == 0)  # the cls slot
    grid = pos[1:].view(h, w, dim)
    # first half of the channels encodes the column, second half the row
    assert torch.allclose(grid[0, :, :dim // 2], grid[2, :, :dim // 2])
    assert torch.allclose(grid[:, 0, dim // 2:], grid[:, 4, dim // 2:])
    # position (row 0, col 1): sin(1 * omega_k), cos(1 * omega_k) with omega_k = 10000^(-k / (dim / 4))
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    assert torch.allclose(grid[0, 1, :dim // 2], torch.cat([omega.sin(), omega.cos()]))


@pytest.mark.parametrize('timm_name,img_size,patch_size', [('vit_tiny_patch16_224', 224, 16),
                                                           ('vit_small_patch16_224', 64, 8)])
def test_encoder_equals_timm_vision_transformer(timm_name, img_size, patch_size):
    torch.manual_seed(0)
    size = timm_name.split('_patch')[0]
    ours = MAE(img_size=img_size, patch_size=patch_size, **VIT_SIZES[size]).eval()
    with torch.no_grad():  # random LayerNorm affines too, so that a swapped norm would show
        for name, param in ours.named_parameters():
            if 'norm' in name:
                param.normal_(1.0 if name.endswith('weight') else 0.0, 0.1)
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img_size,
                                  patch_size=patch_size).eval()
    reference.load_state_dict(encoder_state_dict(ours.state_dict()), strict=True)
    imgs = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(imgs), reference.forward_features(imgs),
                                   rtol=1e-5, atol=1e-5)


def test_attention_backward_copies_the_qkv_gradient_once():
    """q, k and v's gradients are stacked straight into the layout the qkv linear wrote: one copy per block (a
    head-first permute before unbinding, timm's order, adds a clone of the whole qkv gradient)."""
    attention, x = Attention(64, 4), torch.randn(2, 5, 64, requires_grad=True)
    out = attention(x)
    with torch.profiler.profile() as profile:
        out.backward(torch.randn_like(out))  # not .sum(): its expanded gradient makes the projection's mm clone it
    names = [event.name for event in profile.events()]
    assert names.count('aten::stack') == 1 and 'aten::clone' not in names


def test_parameter_names_follow_official_mae_layout():
    names = set(tiny_mae().state_dict())
    for name in ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.bias', 'norm.weight',
                 'decoder_embed.weight', 'mask_token', 'decoder_pos_embed', 'decoder_blocks.0.mlp.fc2.weight',
                 'decoder_norm.bias', 'decoder_pred.weight']:
        assert name in names
    assert set(encoder_state_dict(tiny_mae().state_dict())) == set(ViT(32, 8, 64, 2, 4).state_dict())


def test_loss_counts_hidden_patches_only():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, model.num_patches, 8 * 8 * 3, requires_grad=True)
    mask = torch.zeros(2, model.num_patches)
    mask[:, ::3] = 1
    loss = model.forward_loss(imgs, pred, mask)
    loss.backward()
    assert torch.all(pred.grad[mask == 0] == 0) and torch.all(pred.grad[mask == 1] != 0)
    # by hand: per-patch standardised pixels, squared error averaged over channels, then over hidden patches
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    torch.testing.assert_close(loss, expected)


def test_norm_pix_loss_off_targets_raw_pixels():
    model = tiny_mae(norm_pix_loss=False)
    imgs = torch.randn(1, 3, 32, 32)
    mask = torch.ones(1, model.num_patches)
    assert model.forward_loss(imgs, model.patchify(imgs), mask) == 0


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, model.num_patches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _, _ = model(imgs, 0.75, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_visualize_rows_are_images_in_unit_range():
    model = tiny_mae().eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs)
        rows, caption = model.visualize(imgs, pred, mask)
    assert len(rows) == 4 and all(row.shape == imgs.shape for row in rows)
    assert all(row.min() >= 0 and row.max() <= 1 for row in rows)
    assert 'mean/std of the original' in caption
