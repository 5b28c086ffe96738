"""MCMAE and MR-MCMAE: no leakage through the masked convolutions, block-wise mask upsampling, shapes, and a step."""

import json

import pytest
import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d

import teachers
import train
from mae import VIT_SIZES
from mcmae import MCMAE, ConvViT


def tiny_mcmae(img_size, patch_size=16):
    return MCMAE(img_size=img_size, patch_size=patch_size, **VIT_SIZES['vit_tiny'], decoder_dim=32, decoder_depth=1,
                 decoder_heads=4)


@pytest.mark.parametrize('img_size', [224, 64])
def test_hidden_block_never_reaches_visible_tokens(img_size):
    torch.manual_seed(0)
    model = tiny_mcmae(img_size).eval()
    with torch.no_grad():  # random norm affines and biases everywhere, so that nothing hides behind a zero
        for name, param in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                param.normal_(0.5, 0.5)
    imgs, noise = torch.randn(2, 3, img_size, img_size), torch.rand(2, model.num_patches)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
        width = model.grid_size[1]
        for changed_token, should_change in ((mask[0].argmax().item(), False), (mask[0].argmin().item(), True)):
            row, col = divmod(changed_token, width)
            changed = imgs.clone()
            changed[0, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 10 * torch.randn(3, 16, 16)
            changed_latent, _, _ = model.forward_encoder(changed, 0.75, noise)
            assert torch.equal(changed_latent[1], latent[1])  # other images are untouched in any case
            assert torch.equal(changed_latent[0], latent[0]) != should_change  # exactly equal when the block is hidden


def test_mask_is_upsampled_block_wise_onto_the_stage_grids():
    model = tiny_mcmae(64)
    seen = {}
    model.patch_embed.stage1[0].register_forward_pre_hook(lambda module, args: seen.update(stage1=args[1]))
    model.patch_embed.stage2[0].register_forward_pre_hook(lambda module, args: seen.update(stage2=args[1]))
    noise = torch.rand(2, model.num_patches)
    _, mask, _ = model.forward_encoder(torch.randn(2, 3, 64, 64), 0.75, noise)
    visible = (1 - mask).view(2, 1, 4, 4)
    assert seen['stage2'].shape == (2, 1, 8, 8) and seen['stage1'].shape == (2, 1, 16, 16)
    for stage, factor in (('stage2', 2), ('stage1', 4)):
        for r in range(4 * factor):
            for c in range(4 * factor):
                assert torch.equal(seen[stage][:, 0, r, c], visible[:, 0, r // factor, c // factor])


@pytest.mark.parametrize('img_size', [224, 64])
def test_shapes(img_size):
    model = tiny_mcmae(img_size)
    L = (img_size // 16) ** 2
    loss, pred, mask = model(torch.randn(2, 3, img_size, img_size))
    latent, _, _ = model.forward_encoder(torch.randn(2, 3, img_size, img_size), 0.75)
    assert pred.shape == (2, L, 16 * 16 * 3) and mask.shape == (2, L) and latent.shape == (2, int(L * 0.25), 192)
    assert model.cls_token is None and torch.isfinite(loss)


def test_base_size_is_convmae_b():
    with torch.device('meta'):
        model = MCMAE(img_size=224, patch_size=16, **VIT_SIZES['vit_base'])
    stages = model.patch_embed
    assert [stages.stem1.proj.out_channels, stages.stem2.proj.out_channels, stages.proj.out_channels] == [256, 384, 768]
    assert [len(stages.stage1), len(stages.stage2), len(model.blocks)] == [2, 2, 11]
    assert stages.stem1.proj.stride == (4, 4) and model.fuse1.stride == (4, 4) and model.fuse2.stride == (2, 2)


def run(image_folder, output_dir, *extra):
    args = train.get_args_parser().parse_args([
        '--data', str(image_folder), '--output_dir', str(output_dir), '--model', 'vit_tiny', '--img_size', '32',
        '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--batch_size', '4', '--epochs', '1',
        '--num_workers', '0', '--device', 'cpu', *extra])
    train.main(args)
    return [json.loads(line) for line in (output_dir / 'log.jsonl').read_text().splitlines()]


def test_mcmae_trains_one_epoch(image_folder, tmp_path):
    rows = run(image_folder, tmp_path, '--method', 'mcmae')
    assert torch.isfinite(torch.tensor(rows[0]['loss']))
    assert (tmp_path / 'vis-epoch0000.png').exists()


def test_mrmcmae_trains_one_epoch_with_standin_teachers(image_folder, tmp_path):
    clip, dino = teachers.save_standin_weights(tmp_path / 'teachers')
    rows = run(image_folder, tmp_path / 'out', '--method', 'mrmcmae', '--clip_model', 'ViT-S-16', '--clip_weights',
               str(clip), '--dino_model', 'vit_small_patch16_224.dino', '--dino_weights', str(dino))
    assert all(torch.isfinite(torch.tensor(rows[0][k])) for k in ('loss', 'loss_rec', 'loss_mimic_clip',
                                                                  'loss_mimic_dino'))


def test_patch_size_must_split_into_the_stage_strides(image_folder, tmp_path):
    with pytest.raises(SystemExit, match='must be divisible by 4'):
        run(image_folder, tmp_path, '--method', 'mcmae', '--patch_size', '2', '--img_size', '32')


def test_conv_stages_match_the_official_norms_and_drop_path_rule():
    """ConvMAE's convolution stages use LayerNorm's default eps (1e-5), its transformer blocks 1e-6; fine-tuning's
    drop path rises linearly over all 2 + 2 + 11 blocks of ConvMAE-B, not per stage."""
    encoder = ConvViT(224, 16, 768, 12, 12, drop_path=0.1)
    conv_norms = [m for m in encoder.patch_embed.modules() if isinstance(m, LayerNorm2d)]
    assert len(conv_norms) == 3 + 2 * 4 and {m.eps for m in conv_norms} == {1e-5}
    assert {m.eps for m in encoder.blocks.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    blocks = [*encoder.patch_embed.stage1, *encoder.patch_embed.stage2, *encoder.blocks]
    rates = [block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0 for block in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 15).tolist())
