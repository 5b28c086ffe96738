"""dBOT: targets, loss mask, teachers, and the stage switch (unit level, end to end, and across ranks)."""

import json
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import runtime
import teachers
import train
from dbot import DBOT
from mae import encoder_state_dict, whiten

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_dim=32, decoder_depth=1,
            decoder_heads=4)


def teacher_args(**overrides):
    args = train.get_args_parser().parse_args(['--method', 'dbot', '--img_size', '32', '--patch_size', '8',
                                               '--decoder_dim', '32', '--decoder_depth', '1'])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def build(**overrides):
    """A ViT-Tiny dBOT student and its first teacher, built as train.py builds them."""
    args = teacher_args(**overrides)
    teacher = DBOT.build_teacher(args)
    return DBOT.from_args(args, teacher), teacher


def test_whitening_and_loss_on_hand_checked_example():
    model = DBOT(**TINY)
    # one image, two patches: cls, patch 1 (hidden), patch 2 (visible); width 2
    targets = torch.tensor([[[1.0, 3.0], [0.0, 4.0], [5.0, 5.0]]])
    # the official code's whitening: unbiased variance, so (1, 3) -> (-1, 1) / sqrt(2), not (-1, 1)
    r = 2 ** -0.5
    torch.testing.assert_close(whiten(targets, unbiased=True), torch.tensor([[[-r, r], [-r, r], [0.0, 0.0]]]),
                               atol=1e-5, rtol=0)
    pred = torch.tensor([[[-r, 2 + r], [3 - r, r], [100.0, -100.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    # cls: differences (0, 2) -> |d| >= beta: 2 - beta / 2 = 1, and 0 -> mean 0.5
    # hidden patch: differences (3, 0) -> 3 - 1 = 2, and 0 -> mean 1
    # visible patch: excluded however wrong.  Loss = (0.5 + 1) / 2
    assert model.forward_loss(pred, targets, mask).item() == pytest.approx(0.75, abs=1e-5)


def test_student_predicts_a_feature_for_every_token_including_cls():
    model, teacher = build()
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    assert model.forward_decoder(latent, ids_restore).shape == (2, 1 + 16, 192)
    with torch.inference_mode():
        targets = teacher(imgs)
    assert targets.shape == (2, 1 + 16, 192)
    loss, pred, mask = model(imgs, 0.75, targets=targets)
    loss.backward()  # targets made under inference mode must be usable by the loss
    assert pred.shape == (2, 16, 192) and torch.isfinite(loss)


def test_random_teacher_is_the_students_initialisation_and_frozen():
    model, teacher = build()
    student = encoder_state_dict(model.state_dict())
    assert all(torch.equal(student[k], v) for k, v in teacher.state_dict().items())
    # the target is the last block's output before the final norm
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(imgs), model.forward_blocks(imgs))
    # frozen: no grad, not part of the student, not in the optimizer
    model.train()
    with torch.inference_mode():
        targets = teacher(imgs)
    model(imgs, targets=targets)[0].backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    optimizer = train.build_optimizer(model, teacher_args(), 1e-3)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}


def test_zero_block_teacher_is_normalised_patch_embedding_plus_position():
    model, teacher = build(teacher_depth=0)
    assert len(teacher.blocks) == 0
    imgs = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        patches = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        torch.testing.assert_close(teacher(imgs)[:, 1:], patches)


def test_teacher_from_a_timm_checkpoint_and_a_mismatched_one(tmp_path):
    reference = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, patch_size=8)
    torch.save(reference.state_dict(), tmp_path / 'timm.pth')
    model, teacher = build(teacher=str(tmp_path / 'timm.pth'))
    assert torch.equal(teacher.blocks[3].mlp.fc1.weight, reference.blocks[3].mlp.fc1.weight)
    coarse = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32)
    torch.save(coarse.state_dict(), tmp_path / 'patch16.pth')
    with pytest.raises(ValueError, match='token grid'):
        DBOT.build_teacher(teacher_args(teacher=str(tmp_path / 'patch16.pth')))
    with pytest.raises(ValueError, match='no such file'):
        DBOT.build_teacher(teacher_args(teacher=str(tmp_path / 'missing.pth')))


def test_stage_switch_copies_student_into_teacher_and_reinitialises_student():
    torch.manual_seed(0)
    model, teacher = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs = torch.randn(2, 3, 32, 32)
    for _ in range(3):  # train a little, so that the student is neither its init nor the teacher
        with torch.inference_mode():
            targets = teacher(imgs)
        optimizer.zero_grad()
        model(imgs, targets=targets)[0].backward()
        optimizer.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    old_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}

    teacher = model.next_stage(teacher)

    for key, value in teacher.state_dict().items():
        assert torch.equal(value, trained[key]), key  # a hard copy of the trained encoder
        assert not torch.equal(value, old_teacher[key]) or key == 'pos_embed'
    for key, value in model.state_dict().items():  # every learned tensor re-drawn, encoder and decoder
        if 'pos_embed' not in key and not key.endswith(('norm1.weight', 'norm2.weight', 'norm.weight', 'bias')):
            assert not torch.equal(value, trained[key]), key
    assert all(not p.requires_grad for p in teacher.parameters())
    # the copy is independent: training the new student leaves the teacher alone
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, trained['blocks.0.attn.qkv.weight'])


def run(image_folder, output_dir, *extra):
    args = train.get_args_parser().parse_args([
        '--method', 'dbot', '--data', str(image_folder), '--output_dir', str(output_dir), '--model', 'vit_tiny',
        '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--batch_size', '4',
        '--warmup_epochs', '1', '--num_workers', '0', '--device', 'cpu', '--vis_every', '100', *extra])
    train.main(args)
    return [json.loads(line) for line in (output_dir / 'log.jsonl').read_text().splitlines()]


def kept_teacher(output_dir):
    """The teacher the last checkpoint names: a teacher-stageK.pth of the run, written once per stage."""
    reference = torch.load(output_dir / 'checkpoint-last.pth', weights_only=True)['teacher']
    kept = torch.load(output_dir / reference['teacher_file'], weights_only=True)
    assert kept['written'] == reference['written']
    return reference['teacher_file'], kept['model']


def test_two_stages_end_to_end_restart_the_schedule(image_folder, tmp_path):
    rows = run(image_folder, tmp_path, '--stages', '2', '--epochs', '4')
    assert [row['stage'] for row in rows] == [0, 0, 1, 1]
    assert rows[2]['lr'] == rows[0]['lr'] > rows[1]['lr']  # warmup again at the start of stage 1
    assert all(row['loss'] > 0 for row in rows)
    teacher_file = torch.load(tmp_path / 'teacher-stage1.pth', weights_only=True)
    final = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert final['stage'] == 1
    name, teacher = kept_teacher(tmp_path)
    assert name == 'teacher-stage1.pth' and all(torch.equal(teacher[k], v) for k, v in teacher_file['model'].items())
    assert (tmp_path / 'vis-epoch0003.png').exists()


def test_resume_inside_stage_two_restores_its_teacher(image_folder, tmp_path):
    run(image_folder, tmp_path, '--stage_epochs', '1,1')  # stops after the first epoch of stage 1
    stage1_teacher = torch.load(tmp_path / 'teacher-stage1.pth', weights_only=True)['model']
    rows = run(image_folder, tmp_path, '--stage_epochs', '1,2')  # resumes inside stage 1
    assert [row['stage'] for row in rows] == [0, 1, 1]
    final = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert all(torch.equal(kept_teacher(tmp_path)[1][k], v) for k, v in stage1_teacher.items())
    assert not any(torch.equal(final['model'][k], v) for k, v in stage1_teacher.items() if 'blocks' in k)


def test_teacher_file_loads_as_a_first_teacher(image_folder, tmp_path):
    run(image_folder, tmp_path / 'a', '--stage_epochs', '1,1')
    rows = run(image_folder, tmp_path / 'b', '--stages', '1', '--epochs', '1',
               '--teacher', str(tmp_path / 'a' / 'teacher-stage1.pth'))
    assert len(rows) == 1
    first = torch.load(tmp_path / 'a' / 'teacher-stage1.pth', weights_only=True)['model']
    used = kept_teacher(tmp_path / 'b')[1]
    assert all(torch.equal(used[k], v) for k, v in first.items())


def test_a_wider_teacher_teaches_stage_one_and_the_student_its_own_width_after(image_folder, tmp_path):
    # dBOT's larger-teacher row (a ViT-L teacher of a ViT-B student), small: a timm ViT-S file teaching a ViT-Tiny
    wide = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0, img_size=32, patch_size=8)
    torch.save(wide.state_dict(), tmp_path / 'vit_small.pth')
    model, teacher = build(teacher=str(tmp_path / 'vit_small.pth'))
    assert teacher.width == 384 and model.decoder_pred.out_features == 384 and model.cls_token.shape[-1] == 192
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, wide.blocks[0].attn.qkv.weight)
    assert teacher.blocks[0].attn.num_heads == 6  # the heads of its own width, not the student's 3
    rows = run(image_folder, tmp_path / 'run', '--stages', '2', '--epochs', '2', '--teacher',
               str(tmp_path / 'vit_small.pth'))
    assert [row['stage'] for row in rows] == [0, 1] and all(row['loss'] > 0 for row in rows)
    final = torch.load(tmp_path / 'run' / 'checkpoint-last.pth', weights_only=True)
    assert kept_teacher(tmp_path / 'run')[1]['cls_token'].shape[-1] == 192  # stage 2's teacher: the student's width
    assert final['model']['decoder_pred.weight'].shape == (192, 32)
    # a wider teacher whose patches are not the student's would teach other tokens: refused
    coarse = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0, img_size=32)
    torch.save(coarse.state_dict(), tmp_path / 'vit_small_16.pth')
    with pytest.raises(ValueError, match='token grid'):
        DBOT.build_teacher(teacher_args(teacher=str(tmp_path / 'vit_small_16.pth')))


@pytest.mark.parametrize('flags,message', [
    (['--stages', '0'], r'argument --stages: 0 is outside \[1, '),
    (['--method', 'mae', '--stages', '2'], 'mae does not use it'),
    (['--method', 'mae', '--teacher', 'random'], r'mae does not use it \(it is for dbot, mrmae, mrmcmae\)'),
    (['--teacher_depth', '0', '--method', 'mrmae'], 'mrmae does not use it'),
    (['--stage_epochs', '1,1', '--stages', '3'], 'must give 3'),
])
def test_impossible_stage_and_teacher_flags(image_folder, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(image_folder, tmp_path, *flags)


def _reinit_on_rank(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model, teacher = build()
    torch.manual_seed(100 + rank)  # ranks' RNG streams differ during training, as they do in train.py
    teacher = model.next_stage(teacher)
    before = torch.cat([p.flatten() for p in model.parameters()])
    runtime.broadcast_parameters(model)
    after = torch.cat([p.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(after) for _ in range(world_size)]
    dist.all_gather(gathered, after)
    results[rank] = (bool(torch.equal(gathered[0], gathered[1])), bool(torch.equal(before, after)))
    dist.destroy_process_group()


def test_reinitialised_student_is_identical_on_every_rank():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reinit_on_rank, args=(2, port, results), nprocs=2)
    assert results[0][0] and results[1][0]  # identical after the broadcast
    assert results[0][1] and not results[1][1]  # rank 1 had drawn different weights and took rank 0's


def test_clip_teacher_cosine_loss_and_hash_only_checkpoint(image_folder, tmp_path):
    clip_file, _ = teachers.save_standin_weights(tmp_path / 'teachers')
    # A ViT-Tiny student (width 192) of a ViT-S CLIP: the decoder predicts CLIP's projected tokens, whatever its width
    args = teacher_args(teacher='clip', stages=1, clip_model='ViT-S-16', clip_weights=str(clip_file))
    teacher = DBOT.build_teacher(args)
    model = DBOT.from_args(args, teacher)
    backbone = teacher.clip.backbone
    assert model.cosine_loss and all(not p.requires_grad for p in teacher.parameters())
    assert model.decoder_pred.out_features == backbone.proj.shape[1] == backbone.output_dim
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        targets = teacher(imgs)
        # open_clip's own pooled image embedding is the cls token after the same ln_post and projection
        tokens = teacher.clip.last_two_blocks(teacher.clip.prepare(imgs))[1]
        torch.testing.assert_close(backbone.ln_post(tokens[:, 0]) @ backbone.proj, backbone(teacher.clip.prepare(imgs)))
    assert targets.shape == (2, 16, backbone.output_dim)  # patch tokens only, on the student's 4 x 4 grid
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    pred = torch.cat([torch.randn(2, 1, backbone.output_dim), 3 * targets], dim=1)  # any cls, exact patches
    pred[:, 5:] = torch.randn(2, 12, backbone.output_dim)  # wrong, but only on visible tokens
    assert model.forward_loss(pred, targets, mask).item() == pytest.approx(0.0, abs=1e-5)  # 1 - cos on hidden ones
    with pytest.raises(ValueError, match='single stage.*--stages 1'):
        DBOT.build_teacher(teacher_args(teacher='clip', stages=2, clip_model='ViT-S-16', clip_weights=str(clip_file)))
    rows = run(image_folder, tmp_path / 'run', '--teacher', 'clip', '--clip_model', 'ViT-S-16', '--clip_weights',
               str(clip_file), '--stages', '1', '--epochs', '1')
    assert abs(rows[0]['loss'] - 1) < 0.2  # 1 - cosine is near 1 for a fresh student
    saved = torch.load(tmp_path / 'run' / 'checkpoint-last.pth', weights_only=True)['teacher']
    assert set(saved) == {'model', 'weights', 'sha256'}  # the file's hash, not CLIP's weights
