"""MR-MAE: teachers loaded through the real loaders from stand-in files, grid alignment, and which tokens each loss
touches."""

import json

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import mrmae
import train
from mae import MAE, encoder_state_dict
from mcmae import MCMAE



def mrmae_args(standin, *extra):
    clip, dino = standin
    return train.get_args_parser().parse_args([
        '--method', 'mrmae', '--clip_model', 'ViT-S-16', '--clip_weights', str(clip),
        '--dino_model', 'vit_small_patch16_224.dino', '--dino_weights', str(dino), '--img_size', '32',
        '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', *extra])


def build(args):
    teacher = mrmae.MRMAE.build_teacher(args)
    return mrmae.MRMAE.from_args(args, teacher), teacher


@pytest.mark.parametrize('img_size,patch_size', [(224, 16), (64, 8)])
def test_standin_teachers_load_and_match_the_student_grid(standin, img_size, patch_size):
    args = mrmae_args(standin, '--img_size', str(img_size), '--patch_size', str(patch_size))
    teacher = mrmae.MRMAE.build_teacher(args)
    saved_clip = torch.load(standin[0], weights_only=True)
    assert torch.equal(teacher.teachers['clip'].backbone.conv1.weight, saved_clip['visual.conv1.weight'])
    saved_dino = torch.load(standin[1], weights_only=True)
    dino_block = teacher.teachers['dino'].backbone.blocks[5]
    assert torch.equal(dino_block.mlp.fc2.weight, saved_dino['blocks.5.mlp.fc2.weight'])
    with torch.inference_mode():
        out = teacher(torch.randn(2, 3, img_size, img_size))
    L = (img_size // patch_size) ** 2
    assert {name: f.shape for name, f in out['features'].items()} == {'clip': (2, L, 384), 'dino': (2, L, 384)}
    assert teacher.dims == {'clip': 384, 'dino': 384}
    assert all(not p.requires_grad for p in teacher.parameters())


def test_clip_teacher_equals_open_clip_on_clip_normalised_input(standin):
    """Re-normalisation, last-block tokens before ln_post and the projection, and the [CLS] attention, checked
    against open_clip's own modules."""
    args = mrmae_args(standin, '--img_size', '224', '--patch_size', '16', '--teacher', 'clip', '--focused_mimic')
    teacher = mrmae.MRMAE.build_teacher(args).teachers['clip']
    raw = torch.rand(2, 3, 224, 224)
    imgs = (raw - torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    with torch.no_grad():
        tokens, attention = teacher(imgs, attention=True)
        visual = teacher.backbone
        clip_mean, clip_std = torch.tensor(visual.image_mean), torch.tensor(visual.image_std)
        clip_input = (raw - clip_mean.view(3, 1, 1)) / clip_std.view(3, 1, 1)
        out = visual.forward_intermediates(clip_input, indices=2, intermediates_only=True, output_fmt='NLC',
                                           output_extra_tokens=True)
        torch.testing.assert_close(tokens, out['image_intermediates'][-1], rtol=1e-4, atol=1e-4)
        before_last = torch.cat([out['image_intermediates_prefix'][0], out['image_intermediates'][0]], dim=1)
        block = visual.transformer.resblocks[-1]
        x = block.ln_1(before_last)
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)  # (B, N, N)
        torch.testing.assert_close(attention, weights[:, 0, 1:], rtol=1e-4, atol=1e-5)


def test_mimic_touches_visible_tokens_only_and_reconstruction_hidden_ones(standin):
    torch.manual_seed(0)
    model, teacher = build(mrmae_args(standin))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.inference_mode():
        targets = teacher(imgs)
    loss, pred, mask = model(imgs, 0.75, noise, targets)
    terms = dict(model.loss_terms)
    # Teacher features at hidden positions do not matter; at a visible position they do.
    hidden, visible = mask[0].argmax().item(), mask[0].argmin().item()
    for position, should_change in ((hidden, False), (visible, True)):
        changed = {'features': {k: v.clone() for k, v in targets['features'].items()}, 'attention': None}
        changed['features']['dino'][0, position] += torch.randn(384)
        model(imgs, 0.75, noise, changed)
        assert (model.loss_terms['loss_mimic_dino'] != terms['loss_mimic_dino']) == should_change
        assert model.loss_terms['loss_rec'] == terms['loss_rec']
    # Gradients: the mimic terms never reach the decoder, the reconstruction never reaches the heads.
    latent, mimic_input, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    ids_keep = ids_restore.argsort(dim=1)[:, :latent.shape[1] - 1]
    sum(model.mimic_loss(mimic_input[:, 1:], targets['features'], ids_keep).values()).backward()
    assert all(p.grad is None for p in model.decoder_blocks.parameters())
    assert model.mimic_heads['clip'].weight.grad is not None
    model.zero_grad()
    latent, _, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    model.forward_loss(imgs, model.forward_decoder(latent, ids_restore)[:, 1:], mask).backward()
    assert all(p.grad is None for p in model.mimic_heads.parameters())
    assert loss.item() == pytest.approx(terms['loss_rec'].item() + terms['loss_mimic_clip'].item()
                                        + terms['loss_mimic_dino'].item(), rel=1e-5)


def test_focused_mimic_keeps_the_attended_tokens(standin):
    model, _ = build(mrmae_args(standin, '--focused_mimic'))
    imgs = torch.randn(3, 3, 32, 32)
    attention = torch.full((3, 16), 1e-9)
    attention[:, :4] = 0.25  # all the attention on the first K = 4 tokens
    targets = dict(features={k: torch.randn(3, 16, 384) for k in ('clip', 'dino')}, attention=attention)
    _, _, mask = model(imgs, 0.75, targets=targets)
    assert torch.all(mask[:, :4] == 0) and torch.all(mask[:, 4:] == 1)


def test_fusion_mixes_the_last_layers(standin):
    model, teacher = build(mrmae_args(standin, '--fusion_layers', '3'))
    imgs = torch.randn(2, 3, 32, 32)
    latent, mimic_input, _, _ = model.forward_encoder(imgs, 0.75, torch.rand(2, 16))
    assert not torch.allclose(latent, mimic_input)
    with torch.inference_mode():
        targets = teacher(imgs)
    model(imgs, 0.75, targets=targets)[0].backward()
    assert model.fusion_logits.grad is not None and model.fusion_logits.grad.abs().sum() > 0


def test_own_vit_checkpoint_as_teacher(standin, tmp_path):
    trained = MAE(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, decoder_dim=32, decoder_depth=1)
    torch.save(dict(model=trained.state_dict()), tmp_path / 'mae-teacher.pth')
    args = mrmae_args(standin, '--teacher', f'{tmp_path / "mae-teacher.pth"}+dino', '--img_size', '64')
    teacher = mrmae.MRMAE.build_teacher(args)
    assert list(teacher.dims) == ['mae_teacher', 'dino']
    with torch.inference_mode():
        out = teacher(torch.randn(1, 3, 64, 64))
    assert out['features']['mae_teacher'].shape == (1, 64, 192)  # patch 16 at 128 px: the student's 8 x 8 grid
    own = teacher.teachers['mae_teacher'].backbone
    trained_weights = encoder_state_dict(trained.state_dict())
    assert torch.equal(own.blocks[1].attn.qkv.weight, trained_weights['blocks.1.attn.qkv.weight'])


def test_own_mcmae_checkpoint_as_teacher(standin, tmp_path):
    """An MCMAE encoder trained here teaches with its last transformer block's output over the stage-3 grid, every
    position visible, at the size that puts that grid on the student's; it has no [CLS] token to focus with."""
    torch.manual_seed(0)
    trained = MCMAE(img_size=128, patch_size=16, embed_dim=192, depth=3, num_heads=3, decoder_dim=32, decoder_depth=1)
    for param in trained.parameters():  # away from the initialisation, so that a wrong load would show
        param.data.add_(0.02 * torch.randn_like(param))
    torch.save(dict(model=trained.state_dict()), tmp_path / 'mcmae-teacher.pth')
    args = mrmae_args(standin, '--teacher', str(tmp_path / 'mcmae-teacher.pth'), '--img_size', '64')
    teacher = mrmae.MRMAE.build_teacher(args)
    own = teacher.teachers['mcmae_teacher']
    assert teacher.sources['mcmae_teacher']['model'] == 'mcmae' and own.num_prefix_tokens == 0
    imgs = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features = teacher(imgs)['features']['mcmae_teacher']
        expected = trained.forward_blocks(own.prepare(imgs))  # the pre-training model's own conv stages and blocks
    assert features.shape == (2, 64, 192)  # stride 16 at 128 px: the student's 8 x 8 grid
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match='MCMAE encoders have none'):
        mrmae.MRMAE.build_teacher(mrmae_args(standin, '--teacher', str(tmp_path / 'mcmae-teacher.pth'),
                                             '--img_size', '64', '--focused_mimic'))


def run(image_folder, output_dir, standin, *extra):
    clip, dino = standin
    args = train.get_args_parser().parse_args([
        '--method', 'mrmae', '--data', str(image_folder), '--output_dir', str(output_dir), '--model', 'vit_tiny',
        '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--batch_size', '4',
        '--epochs', '1', '--num_workers', '0', '--device', 'cpu', '--clip_model', 'ViT-S-16', '--clip_weights',
        str(clip), '--dino_model', 'vit_small_patch16_224.dino', '--dino_weights', str(dino), *extra])
    train.main(args)
    return [json.loads(line) for line in (output_dir / 'log.jsonl').read_text().splitlines()]


def test_end_to_end_logs_each_term_and_keeps_teachers_out_of_the_checkpoint(image_folder, tmp_path, standin):
    dino = tmp_path / 'dino.pth'  # a copy of its own, changed below
    dino.write_bytes(standin[1].read_bytes())
    rows = run(image_folder, tmp_path, (standin[0], dino))
    assert {'loss_rec', 'loss_mimic_clip', 'loss_mimic_dino'} <= set(rows[0])
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert not any(k.startswith(('teachers', 'backbone')) for k in checkpoint['model'])
    assert set(checkpoint['teacher']) == {'clip', 'dino'} and len(checkpoint['teacher']['clip']['sha256']) == 64
    # Resuming with another file, or the same file changed, is refused: the targets would silently change.
    with pytest.raises(SystemExit, match=r'belongs to another run: its --dino_weights is .*dino.pth, this run\'s is'):
        run(image_folder, tmp_path, standin, '--epochs', '2')
    weights = torch.load(dino, weights_only=True)
    weights['blocks.0.attn.qkv.weight'] += 1
    torch.save(weights, dino)
    with pytest.raises(SystemExit, match='not the file this run started with'):
        run(image_folder, tmp_path, (standin[0], dino), '--epochs', '2')


@pytest.mark.parametrize('flag,message', [('--clip_weights', 'no such file'), ('--dino_weights', 'no such file')])
def test_missing_weights_is_one_clear_line(image_folder, tmp_path, standin, flag, message):
    paths = {'--clip_weights': str(standin[0]), '--dino_weights': str(standin[1]), flag: str(tmp_path / 'missing.pth')}
    with pytest.raises(SystemExit, match=f'{flag} .*missing.pth: {message}'):
        run(image_folder, tmp_path, (paths['--clip_weights'], paths['--dino_weights']))
