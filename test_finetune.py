"""finetune.py: loading every method's encoder, the timm export, layer-decay groups, and the three modes."""

import json
import math
import os
import signal

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import finetune
import frozen
import teachers
import train
from conftest import for_mode
from mae import encoder_state_dict
from teachers import resize_pos_embed
from mcmae import ConvViT

DOCUMENTED_EXTRAS = ('decoder_', 'mask_token', 'mimic_heads.', 'fusion_logits', 'fuse1.', 'fuse2.')


def pretrain_args(method, standin, *extra):
    return train.get_args_parser().parse_args([
        '--method', method, '--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32',
        '--decoder_depth', '1', '--clip_model', 'ViT-S-16', '--clip_weights', str(standin[0]),
        '--dino_model', 'vit_small_patch16_224.dino', '--dino_weights', str(standin[1]), *extra])


def ft_args(checkpoint, data, output_dir, *extra):
    return finetune.get_args_parser().parse_args(for_mode([
        '--checkpoint', str(checkpoint), '--data', str(data), '--output_dir', str(output_dir), '--batch_size', '4',
        '--epochs', '1', '--warmup_epochs', '1', '--num_workers', '0', '--device', 'cpu', '--crop_pct', '1.0',
        *extra]))


@pytest.mark.parametrize('method', sorted(train.METHODS))
def test_every_methods_encoder_loads_with_only_documented_keys_left_over(method, standin, tmp_path):
    args = pretrain_args(method, standin)
    model_class = train.METHODS[method]
    model = model_class.from_args(args, model_class.build_teacher(args))
    torch.save(dict(model=model.state_dict(), args=vars(args)), tmp_path / 'checkpoint.pth')
    encoder = finetune.load_encoder(ft_args(tmp_path / 'checkpoint.pth', 'unused', tmp_path))
    assert type(encoder) is model_class.encoder_class
    left_over = set(model.state_dict()) - set(encoder.state_dict())
    assert all(key.startswith(DOCUMENTED_EXTRAS) for key in left_over), left_over
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize('name', ['timm.safetensors', 'timm.pth'])
def test_finetuned_export_gives_the_same_logits_in_timm(tmp_path, name):
    torch.manual_seed(0)
    encoder = finetune.load_encoder(ft_args('none', 'unused', tmp_path, '--model', 'vit_tiny', '--patch_size', '8',
                                            '--img_size', '32'))
    model = finetune.Classifier(encoder, 5, 'finetune', 'mean', 2e-5).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a head that says something
        model.fc_norm.weight.normal_(1.0, 0.1)
    finetune.export_timm(model, encoder, tmp_path / name)
    if name.endswith('.safetensors'):  # the format itself, not a pickle under another name
        assert set(safetensors.torch.load_file(tmp_path / name)) == {k.removeprefix('encoder.') for k in
                                                                     model.state_dict()}
    reference = timm.create_model('vit_tiny_patch16_224', pretrained=True, num_classes=5, global_pool='avg',
                                  img_size=32, patch_size=8,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name), num_classes=5)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(imgs), model(imgs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('encoder_class,blocks', [(None, 12), (ConvViT, 11)])
def test_layer_decay_scales(encoder_class, blocks, tmp_path):
    extra = ['--method', 'mcmae'] if encoder_class else []
    encoder = finetune.load_encoder(ft_args('none', 'unused', tmp_path, '--model', 'vit_tiny', '--patch_size', '8',
                                            '--img_size', '32', *extra))
    model = finetune.Classifier(encoder, 3, 'finetune', 'mean', 2e-5)
    groups = finetune.param_groups_layer_decay(model, 0.05, 0.5)
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    top = blocks + 1
    assert scale[id(named['encoder.patch_embed.proj.weight'])] == 0.5 ** top
    assert scale[id(named['encoder.blocks.0.attn.qkv.weight'])] == 0.5 ** (top - 1)
    assert scale[id(named[f'encoder.blocks.{blocks - 1}.mlp.fc2.weight'])] == 0.5
    assert scale[id(named['head.weight'])] == scale[id(named['fc_norm.weight'])] == 1.0
    if encoder_class:  # every convolution stage sits in the lowest group
        conv = [p for n, p in named.items() if n.startswith('encoder.patch_embed.stage')]
        assert conv and all(scale[id(p)] == 0.5 ** top for p in conv)
    decays = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    assert decays[id(named['head.bias'])] == 0 and decays[id(named['head.weight'])] == 0.05


@pytest.fixture(scope='module')
def pretrained(image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp('pretrained')
    train.main(train.get_args_parser().parse_args([
        '--data', str(image_folder), '--output_dir', str(output_dir), '--model', 'vit_tiny', '--img_size', '32',
        '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--batch_size', '4', '--epochs', '1',
        '--num_workers', '0', '--device', 'cpu']))
    return output_dir / 'checkpoint-last.pth'


@pytest.mark.parametrize('mode', ['finetune', 'linprobe'])
def test_one_epoch_logs_validation_accuracy(mode, pretrained, image_folder, tmp_path, capsys):
    finetune.main(ft_args(pretrained, image_folder, tmp_path, '--mode', mode))
    rows = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert len(rows) == 1 and {'train_loss', 'val_loss', 'val_acc1', 'val_acc5'} <= set(rows[0])
    assert 0 <= rows[0]['val_acc1'] <= 100
    assert (tmp_path / 'checkpoint-best.pth').exists() and (tmp_path / 'checkpoint-last.pth').exists()
    assert 'best val top-1' in capsys.readouterr().out


def test_finetuning_under_bf16_autocast_on_the_cpu(pretrained, image_folder, tmp_path, monkeypatch):
    seen, real = [], finetune.Classifier.forward

    def forward(self, imgs):
        logits = real(self, imgs)
        seen.append(logits.dtype)
        return logits

    monkeypatch.setattr(finetune.Classifier, 'forward', forward)
    finetune.main(ft_args(pretrained, image_folder, tmp_path, '--precision', 'bf16'))
    row = json.loads((tmp_path / 'log.jsonl').read_text())
    assert set(seen) == {torch.bfloat16} and math.isfinite(row['train_loss']) and math.isfinite(row['val_loss'])


def test_knn_logs_accuracy(pretrained, image_folder, tmp_path):
    finetune.main(ft_args(pretrained, image_folder, tmp_path, '--mode', 'knn', '--knn_k', '3'))
    row = json.loads((tmp_path / 'log.jsonl').read_text())
    assert row['mode'] == 'knn' and 0 <= row['val_acc1'] <= 100


def test_from_scratch_and_resume(image_folder, tmp_path, capsys):
    """Lengthened, the run continues; its command run again once it is done has nothing to do."""
    scratch = ['--model', 'vit_tiny', '--patch_size', '8', '--img_size', '32', '--mixup', '0', '--cutmix', '0']
    finetune.main(ft_args('none', image_folder, tmp_path, *scratch))
    finetune.main(ft_args('none', image_folder, tmp_path, *scratch, '--epochs', '2'))
    capsys.readouterr()
    finetune.main(ft_args('none', image_folder, tmp_path, *scratch, '--epochs', '2'))
    assert 'nothing to do: ' in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in rows] == [0, 1]


def test_unknown_checkpoint_is_refused(tmp_path):
    torch.save({'weights': torch.zeros(3)}, tmp_path / 'foreign.pth')
    with pytest.raises(SystemExit, match='not a ViT encoder'):
        finetune.load_encoder(ft_args(tmp_path / 'foreign.pth', 'unused', tmp_path))


def test_new_resolution_resamples_the_position_embedding(pretrained, tmp_path):
    encoder = finetune.load_encoder(ft_args(pretrained, 'unused', tmp_path, '--img_size', '64'))
    saved = torch.load(pretrained, weights_only=True)['model']['pos_embed']  # 4 x 4 grid at 32 px, patch 8
    assert saved.shape[1] == 1 + 16 and encoder.pos_embed.shape[1] == 1 + 64
    torch.testing.assert_close(encoder.pos_embed, resize_pos_embed(saved, (8, 8)))
    assert torch.equal(encoder.pos_embed[:, 0], saved[:, 0])  # the cls slot is kept as it is


def test_foreign_resume_checkpoint_is_refused(image_folder, tmp_path):
    torch.save({'model': {}}, tmp_path / 'foreign.pth')
    with pytest.raises(SystemExit, match='not a checkpoint of this script'):
        finetune.main(ft_args('none', image_folder, tmp_path, '--model', 'vit_tiny', '--patch_size', '8',
                              '--img_size', '32', '--resume', str(tmp_path / 'foreign.pth')))


def test_official_mae_checkpoint_layout_loads(tmp_path):
    """Official MAE checkpoints: {'model': flat weights (decoder included), 'args': argparse.Namespace, ...}."""
    import argparse
    from mae import MAE, VIT_SIZES
    official = MAE(img_size=32, patch_size=8, **VIT_SIZES['vit_tiny'], decoder_dim=32, decoder_depth=1)
    torch.save(dict(model=official.state_dict(), args=argparse.Namespace(model='mae_vit_tiny', input_size=32),
                    epoch=799), tmp_path / 'mae_pretrain.pth')
    args = ft_args(tmp_path / 'mae_pretrain.pth', 'unused', tmp_path)  # no --img_size: the checkpoint's 32 px
    encoder = finetune.load_encoder(args)
    assert args.img_size == 32 and args.patch_size == 8 and args.model == 'vit_tiny'
    assert torch.equal(encoder.pos_embed, official.pos_embed)  # its own 4 x 4 grid, not resampled to 224 px
    assert torch.equal(encoder.blocks[11].mlp.fc1.weight, official.blocks[11].mlp.fc1.weight)


# Where the official ConvMAE code (Alpha-VL/ConvMAE: models_convmae.py, vision_transformer.py) keeps each part of
# the hybrid encoder, written from its attribute names: stage by stage, not nested as ours.
OFFICIAL_CONVMAE = [('patch_embed.stem1.', 'patch_embed1.'), ('patch_embed.stage1.', 'blocks1.'),
                    ('patch_embed.stem2.', 'patch_embed2.'), ('patch_embed.stage2.', 'blocks2.'),
                    ('patch_embed.linear.', 'patch_embed4.'), ('patch_embed.', 'patch_embed3.'),
                    ('blocks.', 'blocks3.'), ('fuse1.', 'stage1_output_decode.'), ('fuse2.', 'stage2_output_decode.')]


def official_convmae_names(state):
    rename = lambda key: next((theirs + key.removeprefix(ours) for ours, theirs in OFFICIAL_CONVMAE  # noqa: E731
                               if key.startswith(ours)), key)
    return {rename(key): value for key, value in state.items()}


def test_official_convmae_checkpoint_loads_for_evaluation_and_as_a_teacher(image_folder, tmp_path):
    import argparse
    from mae import VIT_SIZES
    from mcmae import MCMAE
    ours = MCMAE(img_size=32, patch_size=16, **VIT_SIZES['vit_tiny'], decoder_dim=32, decoder_depth=1)
    official = official_convmae_names(ours.state_dict())
    assert {'patch_embed1.norm.weight', 'blocks1.1.attn.weight', 'patch_embed3.proj.weight', 'patch_embed4.weight',
            'blocks3.10.attn.qkv.weight', 'stage2_output_decode.weight', 'norm.weight'} <= set(official)
    torch.save(dict(model=official, args=argparse.Namespace(model='convmae_convvit_tiny_patch16', input_size=32)),
               tmp_path / 'convmae_pretrain.pth')
    args = ft_args(tmp_path / 'convmae_pretrain.pth', image_folder, tmp_path / 'knn', '--mode', 'knn', '--knn_k', '3')
    encoder = finetune.load_encoder(args)
    assert type(encoder) is ConvViT and (args.method, args.model, args.patch_size, args.img_size) == (
        'mcmae', 'vit_tiny', 16, 32)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    finetune.main(ft_args(tmp_path / 'convmae_pretrain.pth', image_folder, tmp_path / 'knn', '--mode', 'knn',
                          '--knn_k', '3'))
    assert 0 <= json.loads((tmp_path / 'knn' / 'log.jsonl').read_text())['val_acc1'] <= 100
    # as MR-MAE's teacher: the same tokens as our own file of the same weights
    torch.save(ours.state_dict(), tmp_path / 'ours.pth')
    imgs = torch.randn(2, 3, 32, 32)
    theirs_teacher, source = teachers.load_own(str(tmp_path / 'convmae_pretrain.pth'), (2, 2))
    assert source['model'] == 'mcmae'
    assert torch.equal(theirs_teacher(imgs)[0], teachers.load_own(str(tmp_path / 'ours.pth'), (2, 2))[0](imgs)[0])
    # a fine-tuned official ConvMAE (fc_norm and head in place of the final norm) fine-tunes again
    tuned = {k: v for k, v in official.items() if not k.startswith('norm.')}
    tuned.update({'fc_norm.weight': torch.ones(192), 'fc_norm.bias': torch.zeros(192), 'head.weight': torch.zeros(
        5, 192), 'head.bias': torch.zeros(5)})
    torch.save(dict(model=tuned), tmp_path / 'convmae_finetuned.pth')
    assert type(finetune.load_encoder(ft_args(tmp_path / 'convmae_finetuned.pth', 'unused', tmp_path))) is ConvViT


@pytest.mark.parametrize('mode', ['finetune', 'linprobe'])
def test_finetuning_trains_the_position_embedding_without_weight_decay(mode, tmp_path):
    """Pre-training keeps the sin-cos position code fixed; the official MAE, dBOT and ConvMAE fine-tuning train it (in
    the lowest layer-decay group, without weight decay). A linear probe trains nothing of the encoder."""
    encoder = finetune.load_encoder(ft_args('none', 'unused', tmp_path, '--model', 'vit_tiny', '--patch_size', '8',
                                            '--img_size', '32', '--mode', mode))
    model = finetune.Classifier(encoder, 3, mode, 'mean', 2e-5)
    before = encoder.pos_embed.detach().clone()
    groups = finetune.param_groups_layer_decay(model, 0.05, 0.5)
    group = next((g for g in groups if any(p is encoder.pos_embed for p in g['params'])), None)
    if mode == 'linprobe':
        assert group is None and not encoder.pos_embed.requires_grad
        return
    assert group['weight_decay'] == 0 and group['lr_scale'] == 0.5 ** 13
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    optimizer.step()
    assert not torch.equal(encoder.pos_embed, before)


def test_signal_mid_epoch_checkpoints_and_the_rerun_continues_exactly(image_folder, tmp_path, monkeypatch):
    flags = ['--model', 'vit_tiny', '--patch_size', '8', '--img_size', '32', '--epochs', '2']
    finetune.main(ft_args('none', image_folder, tmp_path / 'straight', *flags))
    calls, real = [0], finetune.Classifier.forward

    def forward(self, imgs):  # a real SIGTERM from inside the second training step
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, imgs)

    monkeypatch.setattr(finetune.Classifier, 'forward', forward)
    finetune.main(ft_args('none', image_folder, tmp_path / 'stopped', *flags))
    checkpoint = torch.load(tmp_path / 'stopped' / 'checkpoint-last.pth', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['step']) == (0, 2)
    monkeypatch.undo()
    finetune.main(ft_args('none', image_folder, tmp_path / 'stopped', *flags))
    straight, stopped = ([json.loads(line) for line in (tmp_path / d / 'log.jsonl').read_text().splitlines()]
                         for d in ('straight', 'stopped'))
    assert [r['train_loss'] for r in stopped] == pytest.approx([r['train_loss'] for r in straight], rel=1e-4)
    assert [r['val_loss'] for r in stopped] == pytest.approx([r['val_loss'] for r in straight], rel=1e-4)


def colour_classes(root, per_class=12, size=32):
    """Two classes a frozen random encoder already separates: reddish and bluish noise images."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (('train', per_class), ('val', per_class // 2)):
        for k, channel in enumerate((0, 2)):
            (root / split / f'class_{k}').mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 120, (size, size, 3), generator=generator, dtype=torch.uint8)
                pixels[..., channel] += 135
                Image.fromarray(pixels.numpy()).save(root / split / f'class_{k}' / f'{i}.png')
    return root


def test_frozen_mode_knn_and_linear_probe_on_features_computed_once(pretrained, tmp_path, monkeypatch,
                                                                    capsys):
    data = colour_classes(tmp_path / 'data')
    out = tmp_path / 'frozen'
    finetune.main(ft_args(pretrained, data, out, '--mode', 'frozen', '--knn_k', '5', '--epochs', '20'))
    row = json.loads((out / 'log.jsonl').read_text())
    assert row['mode'] == 'frozen' and row['knn_acc1'] == 100 and row['linear_acc1'] == 100
    assert row['k'] == 5 and row['linear_epochs'] == 20
    # a rerun on the same encoder reads the cached features back; k-NN alone agrees with frozen's k-NN
    monkeypatch.setattr(frozen, 'extract_features', lambda *a: pytest.fail('features computed again'))
    finetune.main(ft_args(pretrained, data, out, '--mode', 'knn', '--knn_k', '5'))
    knn_row = json.loads((out / 'log.jsonl').read_text().splitlines()[-1])
    assert knn_row['val_acc1'] == row['knn_acc1'] and knn_row['val_acc5'] == row['knn_acc5']
    # a damaged cache (a copy cut short) is rebuilt, with the same result
    monkeypatch.undo()
    cache = (out / 'features.pt').read_bytes()
    (out / 'features.pt').write_bytes(cache[:len(cache) // 2])
    finetune.main(ft_args(pretrained, data, out, '--mode', 'knn', '--knn_k', '5'))
    assert 'rebuilding' in capsys.readouterr().err
    assert json.loads((out / 'log.jsonl').read_text().splitlines()[-1])['val_acc1'] == row['knn_acc1']


def test_linear_probe_on_features_learns_a_linear_rule():
    """Labels that a linear rule of the features gives exactly: the classifier finds it; shuffled labels it cannot."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=generator) * 5 + 3
    y = (x[:, 0] - x[:, 3] > 0).long()
    args = finetune.get_args_parser().parse_args(['--checkpoint', 'none', '--data', '.', '--mode', 'frozen'])
    finetune.validate_args(args)
    args.batch_size = 32
    assert frozen.linear_on_features(x[:400], y[:400], x[400:], y[400:], 2, args)['val_acc1'] >= 95
    shuffled = y[torch.randperm(600, generator=generator)]
    assert frozen.linear_on_features(x[:400], shuffled[:400], x[400:], shuffled[400:], 2, args)['val_acc1'] < 75


def test_safetensors_export_reads_back_as_a_checkpoint_and_a_teacher(pretrained, image_folder, tmp_path):
    exported = tmp_path / 'encoder.safetensors'
    finetune.main(ft_args(pretrained, image_folder, tmp_path / 'knn', '--mode', 'knn', '--knn_k', '3',
                          '--export_timm', str(exported)))
    finetune.main(ft_args(exported, image_folder, tmp_path / 'knn_again', '--mode', 'knn', '--knn_k', '3'))
    first, again = (json.loads((tmp_path / name / 'log.jsonl').read_text()) for name in ('knn', 'knn_again'))
    assert (first['val_acc1'], first['val_acc5']) == (again['val_acc1'], again['val_acc5'])
    teacher, source = teachers.load_own(str(exported), (4, 4))
    trained = encoder_state_dict(torch.load(pretrained, weights_only=False)['model'])
    assert torch.equal(teacher.backbone.blocks[0].attn.qkv.weight, trained['blocks.0.attn.qkv.weight'])


def test_min_lr_above_the_peak_is_refused_and_a_zero_head_init_is_zeros(pretrained, image_folder, tmp_path):
    with pytest.raises(SystemExit, match='--min_lr 1 is above the peak lr'):  # the cosine would rise, not decay
        finetune.main(ft_args(pretrained, image_folder, tmp_path, '--min_lr', '1'))
    for std in (0.0, 0.01):  # the official heads: dBOT 0.01, MAE and ConvMAE 2e-5; 0 is a zero head
        head = finetune.Classifier(ConvViT(32, 16, 192, 2, 3), 3, 'finetune', 'mean', std).head.weight
        assert head.abs().max() == 0 if std == 0 else 0 < head.std() < 2 * std


def test_knn_votes_do_not_overflow_at_a_low_temperature():
    """--knn_t 0.01: exp(similarity / 0.01) is beyond float32 from similarity 0.89 on. One neighbour of class 1 at
    cosine 0.99 outweighs three of class 0 at 0.95 (exp(99) > 3 exp(95)); with overflowing weights both classes got
    inf and the tie picked class 0."""
    def at(cosine):  # a unit vector at this cosine similarity to the query, the first axis
        return torch.tensor([cosine, (1 - cosine ** 2) ** 0.5, 0.0])
    bank = torch.stack([at(0.95), at(0.95), at(0.95), at(0.99), torch.tensor([0.0, 0.0, 1.0])])
    labels = torch.tensor([0, 0, 0, 1, 0])
    query = torch.tensor([[1.0, 0.0, 0.0]])
    assert (torch.tensor([0.95, 0.99]) / 0.01).exp().isinf().all()  # what float32 made of both classes' votes
    result = frozen.knn_evaluate(bank, labels, query, torch.tensor([1]), 2, k=4, temperature=0.01)
    assert result['val_acc1'] == 100.0
