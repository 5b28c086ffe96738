"""Bad input, tried the way a new user and a hostile one would: every case must be refused in one line naming the
flag or file (a non-zero exit, no traceback) or, where README calls the input valid, work correctly. The test tries
them all in this process and reports the figure README quotes: tried, tracebacks, silently wrong."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from PIL import Image

import bench
import data
import finetune
import flags
import reproduce
import train
from conftest import for_mode, make_image_folder

PRETRAIN = ['--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth',
            '1', '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu',
            '--vis_every', '100']
EVALUATE = ['--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu',
            '--crop_pct', '1.0']


def attempt(script, argv):
    """-> ('refused', message) | ('traceback', repr) | ('ran', None)."""
    module = train if script == 'train' else finetune
    argv = argv if script == 'train' else for_mode(argv)
    try:
        module.main(module.get_args_parser().parse_args(argv))
    except SystemExit as e:  # flags the parser refuses end here too, in one line (flags.ArgumentParser)
        message = str(e.code)
        ok = e.code not in (0, None) and message.startswith('error: ') and '\n' not in message.strip()
        return ('refused', message) if ok else ('traceback', f'SystemExit({message!r})')
    except Exception as e:  # noqa: BLE001 - the point is to catch whatever escapes
        return 'traceback', f'{type(e).__name__}: {e}'
    return 'ran', None


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Data sets, checkpoints and files that the cases need, made once."""
    root = tmp_path_factory.mktemp('bad_input')
    w = dict(root=root, data=make_image_folder(root / 'data'))
    w['file'] = root / 'a_file'
    w['file'].write_text('not a folder')
    (root / 'empty' / 'train' / 'class_0').mkdir(parents=True)
    w['empty'] = root / 'empty'
    w['val_only'] = root / 'val_only'
    shutil.copytree(w['data'] / 'val', w['val_only'] / 'val')
    w['unreadable'] = root / 'unreadable'
    for k in range(2):
        folder = w['unreadable'] / 'train' / f'class_{k}'
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f'{i}.jpg').write_bytes(b'not an image')
    w['validation_only'] = root / 'validation_only'  # a validation split under another usual name, and no train/
    shutil.copytree(w['data'] / 'val', w['validation_only'] / 'Validation')
    w['two_trains'] = root / 'two_trains'  # train/ and Training/: either could be meant
    shutil.copytree(w['data'], w['two_trains'])
    shutil.copytree(w['data'] / 'train', w['two_trains'] / 'Training')
    w['no_val'] = root / 'no_val'
    shutil.copytree(w['data'] / 'train', w['no_val'] / 'train')
    w['val_missing_class'] = root / 'val_missing_class'
    shutil.copytree(w['data'], w['val_missing_class'])
    shutil.rmtree(w['val_missing_class'] / 'val' / 'class_1')
    w['official_val'] = root / 'official_val'  # Tiny-ImageNet as distributed: val/images/*.JPEG
    shutil.copytree(w['data'] / 'train', w['official_val'] / 'train')
    (w['official_val'] / 'val' / 'images').mkdir(parents=True)
    for i in range(4):
        Image.new('RGB', (40, 40)).save(w['official_val'] / 'val' / 'images' / f'val_{i}.JPEG')
    # data folders whose symbolic links would list images twice or under another class's label
    for name, link, target in [('link_loop', 'train/class_0/again', '..'), ('link_up', 'train/class_0/up', '../..'),
                               ('class_alias', 'train/class_2', 'class_0'),
                               ('file_alias', 'train/class_1/also.jpg', '../class_0/1.jpg')]:
        w[name] = root / name
        shutil.copytree(w['data'], w[name])
        (w[name] / link).symlink_to(target)
    # checkpoints of our runs
    for method in ('mae', 'dbot', 'mcmae'):
        assert attempt('train', ['--data', str(w['data']), '--output_dir', str(root / method), '--method', method,
                                 *PRETRAIN, *(['--stages', '1'] if method == 'dbot' else [])])[0] == 'ran'
        w[method] = root / method / 'checkpoint-last.pth'
    for mode in ('finetune', 'linprobe'):  # finetune.py's own checkpoints, as teachers below
        assert attempt('finetune', ['--checkpoint', str(w['mae']), '--data', str(w['data']), *EVALUATE, '--mode', mode,
                                    '--output_dir', str(root / mode)])[0] == 'ran'
        w[mode] = root / mode / 'checkpoint-last.pth'
    raw = w['mae'].read_bytes()
    w['truncated'] = root / 'truncated.pth'
    w['truncated'].write_bytes(raw[:len(raw) // 2])
    w['foreign'] = root / 'foreign.pth'
    torch.save({'weights': torch.zeros(3)}, w['foreign'])
    w['timm64'] = root / 'timm64.pth'  # a bare timm ViT-Tiny/8 trained at 64 px: 8 x 8 position grid
    torch.save(timm.create_model('vit_tiny_patch16_224', patch_size=8, img_size=64, num_classes=0).state_dict(),
               w['timm64'])
    yield w
    shutil.rmtree(root, ignore_errors=True)  # its runs' checkpoints (600 MB) are not kept past the module


def cases(w):
    """(script, argv, 'refused'): each must end in one line; inputs that must work are tested below."""
    data, r = str(w['data']), w['root']
    pre = lambda *extra: ['--data', data, *PRETRAIN, *extra]
    ev = lambda checkpoint, *extra: ['--checkpoint', str(checkpoint), '--data', data, *EVALUATE, *extra]
    out = []
    bad_pretrain_flags = [
        # sizes no real model has (they only exhaust the memory); flags the teacher does not read (issue 34)
        ['--decoder_depth', '2147483647'], ['--img_size', '100000'], ['--decoder_dim', '1000000'],
        ['--method', 'dbot', '--teacher', 'random', '--clip_model', 'ViT-L-14'],
        ['--method', 'dbot', '--teacher', str(w['mae']), '--teacher_depth', '2'],
        ['--method', 'mrmae', '--teacher', str(w['mae']), '--dino_weights', 'x.bin'],
        ['--method', 'mrmae', '--teacher', 'clip', '--dino_model', 'vit_small_patch16_224'],
        ['--data', str(w['validation_only'])], ['--data', str(w['two_trains'])],
        ['--img_size', '0'], ['--img_size', '-8'], ['--img_size', '30'], ['--patch_size', '0'], ['--patch_size', '-1'],
        ['--batch_size', '0'], ['--batch_size', '-1'], ['--accum_iter', '0'], ['--epochs', '0'], ['--epochs', '-1'],
        ['--warmup_epochs', '-1'], ['--blr', '0'], ['--blr', '-1e-4'], ['--lr', '-1'], ['--lr', '0'],
        ['--weight_decay', '-0.1'], ['--mask_ratio', '0'], ['--mask_ratio', '1'], ['--mask_ratio', '1.5'],
        ['--mask_ratio', '-0.1'], ['--drop_path', '-0.1'], ['--drop_path', '1.0'], ['--decoder_dim', '0'],
        ['--decoder_dim', '30'], ['--decoder_heads', '0'], ['--decoder_heads', '3'], ['--decoder_depth', '-1'],
        ['--log_every', '0'], ['--log_every', '-1'], ['--vis_every', '0'], ['--num_workers', '-1'],
        ['--save_epochs', '0'], ['--save_epochs', '2'], ['--save_epochs', '1,x'], ['--save_epochs', ''],
        ['--mask_ratio', '0.99'], ['--mask_ratio', '1e-17'], ['--img_size', '8', '--patch_size', '8'],
        ['--device', 'cuda'] if not torch.cuda.is_available() else ['--device', 'cuda:99'], ['--device', 'tpu'],
        ['--device', 'bogus'], ['--betas', '1.0', '0.9'], ['--betas', '0.9', '-0.1'], ['--opt_eps', '0'],
        ['--clip_grad', '0'], ['--clip_grad', '-1'], ['--skip_nonfinite', '-1'], ['--precision', 'fp16'],
        ['--model', 'vit_giant'], ['--method', 'bogus'], ['--epochs', 'ten'],
        ['--method', 'dbot', '--stages', '0'], ['--method', 'dbot', '--stage_epochs', '1,0'],
        ['--method', 'dbot', '--stage_epochs', '1,1', '--stages', '3'],
        ['--method', 'dbot', '--epochs', '5', '--stage_epochs', '1,1'], ['--method', 'dbot', '--teacher_depth', '100'],
        ['--method', 'dbot', '--teacher_depth', '-1'], ['--method', 'mrmae', '--fusion_layers', '100'],
        ['--method', 'mrmae', '--fusion_layers', '-1'], ['--method', 'mrmae', '--mimic_weight', '-1'],
        ['--method', 'mae', '--teacher_depth', '0'], ['--method', 'mae', '--clip_weights', 'x.pth'],
        ['--method', 'mae', '--stages', '2'], ['--method', 'dbot', '--mimic_weight', '2'],
        ['--method', 'mcmae', '--patch_size', '6', '--img_size', '36'],
        ['--method', 'mrmae'], ['--method', 'mrmae', '--teacher', 'clip', '--clip_weights', '/nonexistent.bin'],
        ['--method', 'mrmae', '--teacher', 'dino', '--dino_model', 'bogus_model', '--dino_weights', str(w['foreign'])],
        ['--method', 'mrmae', '--teacher', 'clip', '--clip_model', 'bogus', '--clip_weights', str(w['foreign'])],
        ['--method', 'mrmae', '--teacher', 'clip', '--clip_model', 'ViT-S-16', '--clip_weights', str(w['foreign'])],
        ['--method', 'dbot', '--teacher', 'clip', '--stages', '2', '--epochs', '2'],
        ['--method', 'dbot', '--stages', '1', '--teacher', '/nonexistent.pth'], ['--method', 'dbot', '--stages', '1', '--teacher', str(w['foreign'])],
        ['--method', 'dbot', '--stages', '1', '--teacher', str(w['truncated'])], ['--method', 'mrmae', '--teacher', str(w['foreign'])],
        ['--method', 'dbot', '--stages', '1', '--teacher', str(w['mcmae'])],
        ['--method', 'mrmcmae', '--teacher', str(w['mcmae']), '--focused_mimic'],  # no [CLS] attention to follow
        ['--method', 'dbot', '--stages', '1', '--teacher', str(w['finetune'])],  # a classifier, without its norm
        ['--method', 'mrmae', '--teacher', str(w['finetune'])],
        ['--compile', 'bogus'], ['--compile', 'reduce-overhead'], ['--compile', 'max-autotune'],  # graphs: GPUs only
    ]
    for i, extra in enumerate(bad_pretrain_flags):
        out.append(('train', pre('--output_dir', str(r / f'p{i}'), *extra), 'refused'))
    for i, folder in enumerate(['/nonexistent', w['file'], w['empty'], w['val_only'], w['unreadable'], w['link_loop'],
                                w['link_up'], w['class_alias'], w['file_alias']]):
        out.append(('train', ['--data', str(folder), *PRETRAIN, '--output_dir', str(r / f'd{i}')], 'refused'))
    out += [
        ('train', pre('--output_dir', str(w['file'] / 'out')), 'refused'),
        ('train', pre('--output_dir', str(r / 'r0'), '--resume', '/nonexistent.pth'), 'refused'),
        ('train', pre('--output_dir', str(r / 'r1'), '--resume', str(w['truncated'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r2'), '--resume', str(w['foreign'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r3'), '--resume', str(w['timm64'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r4'), '--method', 'dbot', '--stages', '1', '--resume', str(w['mae'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r5'), '--resume', str(w['dbot'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r6'), '--model', 'vit_small', '--resume', str(w['mae'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r7'), '--img_size', '64', '--resume', str(w['mae'])), 'refused'),
        ('train', pre('--output_dir', str(r / 'r8'), '--data', str(w['no_val']), '--resume', str(w['mae'])),
         'refused'),
    ]
    bad_evaluate = [
        # flags the mode does not read, exports over what the run reads, a crop that only exhausts the memory
        ev(w['mae'], '--pool', 'cls'), ev(w['mae'], '--mode', 'knn', '--mixup', '0.5'),
        ev(w['mae'], '--mode', 'knn', '--seed', '3'), ev(w['mae'], '--mode', 'linprobe', '--aa', 'rand-m5'),
        ev(w['mae'], '--mode', 'frozen', '--resume', str(w['mae'])), ev(w['mae'], '--crop_pct', '1e-5'),
        ev(w['mae'], '--mode', 'knn', '--export_timm', str(w['mae'])),
        ev(w['mae'], '--mode', 'knn', '--data', str(w['validation_only'])),
        ev('/nonexistent.pth'), ev(w['foreign']), ev(w['truncated']), ev(w['file']), ['--checkpoint', 'none',
                                                                                       '--data', data, *EVALUATE],
        ev(w['mae'], '--batch_size', '0'), ev(w['mae'], '--epochs', '0'), ev(w['mae'], '--epochs', '-1'),
        ev(w['mae'], '--mode', 'knn', '--knn_k', '0'), ev(w['mae'], '--mode', 'knn', '--knn_k', '-5'),
        ev(w['mae'], '--mode', 'knn', '--knn_t', '0'), ev(w['mae'], '--mode', 'knn', '--knn_t', '-1'),
        ev(w['mae'], '--nb_classes', '1'), ev(w['mae'], '--nb_classes', '0'), ev(w['mae'], '--blr', '-1'),
        ev(w['mae'], '--lr', '0'), ev(w['mae'], '--layer_decay', '0'), ev(w['mae'], '--layer_decay', '1.5'),
        ev(w['mae'], '--drop_path', '1.0'), ev(w['mae'], '--reprob', '1.5'), ev(w['mae'], '--smoothing', '1.0'),
        ev(w['mae'], '--mixup', '-1'), ev(w['mae'], '--cutmix', '-1'), ev(w['mae'], '--crop_pct', '0'),
        ev(w['mae'], '--crop_pct', '1.5'), ev(w['mae'], '--min_lr', '-1'), ev(w['mae'], '--weight_decay', '-1'),
        ev(w['mae'], '--warmup_epochs', '-1'), ev(w['mae'], '--num_workers', '-1'), ev(w['mae'], '--img_size', '30'),
        ev(w['mae'], '--img_size', '0'), ev(w['mae'], '--patch_size', '0'), ev(w['mae'], '--device', 'bogus'),
        ev(w['mae'], '--device', 'cuda') if not torch.cuda.is_available() else ev(w['mae'], '--device', 'cuda:99'),
        ev(w['mae'], '--mode', 'bogus'), ev(w['mae'], '--model', 'vit_giant'), ev(w['mae'], '--aa', 'bogus'),
        ev(w['mae'], '--export_timm', str(w['file'] / 'dir' / 'x.pth')), ev(w['mcmae'], '--export_timm', str(r / 'x.pth')),
        ev(w['mcmae'], '--mode', 'linprobe', '--pool', 'cls'), ev(w['mae'], '--clip_grad', '0'),
        ['--checkpoint', str(w['mae']), '--data', str(w['no_val']), *EVALUATE],
        ['--checkpoint', str(w['mae']), '--data', str(w['val_missing_class']), *EVALUATE, '--mode', 'knn'],
        ['--checkpoint', str(w['mae']), '--data', str(w['official_val']), *EVALUATE],
        ['--checkpoint', str(w['mae']), '--data', '/nonexistent', *EVALUATE],
        *[['--checkpoint', str(w['mae']), '--data', str(w[name]), *EVALUATE, '--mode', 'knn']
          for name in ('link_loop', 'link_up', 'class_alias', 'file_alias')],
        ev(w['mae'], '--output_dir', str(w['file'] / 'out')),
    ]
    for i, argv in enumerate(bad_evaluate):
        out.append(('finetune', argv + (['--output_dir', str(r / f'e{i}')] if '--output_dir' not in argv else []),
                    'refused'))
    return out


def finetune_in_a_folder_of_another_run(w):
    """A linear probe of dBOT in the folder of a finished linear probe of MAE must not resume MAE's."""
    folder = w['root'] / 'shared_probe'
    first = attempt('finetune', ['--checkpoint', str(w['mae']), '--data', str(w['data']), *EVALUATE, '--mode',
                                 'linprobe', '--output_dir', str(folder)])
    assert first[0] == 'ran', first
    return [('finetune', ['--checkpoint', str(w['dbot']), '--data', str(w['data']), *EVALUATE, '--mode', 'linprobe',
                          '--output_dir', str(folder)], 'refused'),
            ('finetune', ['--checkpoint', str(w['mae']), '--data', str(w['data']), *EVALUATE, '--mode', 'finetune',
                          '--output_dir', str(folder)], 'refused')]


def test_bad_inputs_are_refused_in_one_line(world, capsys):
    tried = cases(world) + finetune_in_a_folder_of_another_run(world)
    outcomes = [(script, argv, expect, *attempt(script, argv)) for script, argv, expect in tried]
    tracebacks = [(script, argv, detail) for script, argv, _, kind, detail in outcomes if kind == 'traceback']
    silent = [(script, argv) for script, argv, expect, kind, _ in outcomes if expect == 'refused' and kind == 'ran']
    with capsys.disabled():
        print(f'\nbad inputs: {len(outcomes)} tried, {len(tracebacks)} tracebacks, {len(silent)} silently wrong')
    assert len(outcomes) >= 100
    assert tracebacks == [] and silent == []


def test_inputs_readme_calls_valid_work_correctly(world, capfd):
    root = world['root']
    # a malformed log.jsonl (a write cut short) on resume: the line goes, with a warning, and the run continues;
    # raising --epochs on resume re-stretches the schedule, and says so
    folder = root / 'malformed_log'
    argv = ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(folder)]
    assert attempt('train', argv)[0] == 'ran'
    with open(folder / 'log.jsonl', 'a') as f:
        f.write('{"epoch": 1, "lo')
    capfd.readouterr()
    assert attempt('train', [*argv, '--epochs', '2'])[0] == 'ran'
    out, err = capfd.readouterr()
    assert 'dropping line 2' in err
    assert 'was trained with --stage_epochs [1]; this run continues with --stage_epochs [2]' in out
    rows = [json.loads(line) for line in (folder / 'log.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in rows] == [0, 1]
    # an MCMAE encoder trained here teaches MR-MAE and MR-MCMAE (dBOT's teacher must be a ViT: refused above)
    for method in ('mrmae', 'mrmcmae'):
        assert attempt('train', ['--data', str(world['data']), *PRETRAIN, '--method', method, '--teacher',
                                 str(world['mcmae']), '--output_dir', str(root / f'{method}_mcmae_teacher')])[0] == 'ran'
    # a linear probe's checkpoint (the encoder intact, with its final norm) teaches dBOT and MR-MAE, and gives the
    # same k-NN as the encoder it probed
    for method in ('dbot', 'mrmae'):
        assert attempt('train', ['--data', str(world['data']), *PRETRAIN, '--method', method, '--teacher',
                                 str(world['linprobe']), '--output_dir', str(root / f'{method}_probe_teacher'),
                                 *(['--stages', '1'] if method == 'dbot' else [])]) == ('ran', None)
    for name in ('mae', 'linprobe'):
        assert attempt('finetune', ['--checkpoint', str(world[name]), '--data', str(world['data']), *EVALUATE,
                                    '--mode', 'knn', '--output_dir', str(root / f'knn_of_{name}')])[0] == 'ran'
    assert (json.loads((root / 'knn_of_mae' / 'log.jsonl').read_text())['val_acc1'] ==
            json.loads((root / 'knn_of_linprobe' / 'log.jsonl').read_text())['val_acc1'])
    # k-NN with fewer training images than --knn_k reports the k it used
    knn = root / 'knn'
    assert attempt('finetune', ['--checkpoint', str(world['mae']), '--data', str(world['data']), *EVALUATE, '--mode',
                                'knn', '--output_dir', str(knn)])[0] == 'ran'
    assert json.loads((knn / 'log.jsonl').read_text())['k'] == 16  # 16 training images, --knn_k 20
    # a bare timm state dict of a 64 px model is evaluated at 64 px, not 224
    args = finetune.get_args_parser().parse_args(['--checkpoint', str(world['timm64']), '--data', 'unused'])
    encoder = finetune.load_encoder(args)
    assert args.img_size == 64 and encoder.grid_size == (8, 8)
    # our own fine-tuned export fine-tunes again
    exported = root / 'exported.pth'
    assert attempt('finetune', ['--checkpoint', str(world['mae']), '--data', str(world['data']), *EVALUATE,
                                '--output_dir', str(root / 'export_run'), '--export_timm', str(exported)])[0] == 'ran'
    assert attempt('finetune', ['--checkpoint', str(exported), '--data', str(world['data']), *EVALUATE,
                                '--output_dir', str(root / 'refine')])[0] == 'ran'
    # finetune.py's own checkpoint fine-tunes again (its head is left behind); its frozen features are refused
    own = ['--checkpoint', str(root / 'export_run' / 'checkpoint-last.pth'), '--data', str(world['data']), *EVALUATE]
    assert attempt('finetune', own + ['--output_dir', str(root / 'own_finetune')])[0] == 'ran'
    kind, message = attempt('finetune', own + ['--mode', 'knn', '--output_dir', str(root / 'own_knn')])
    assert kind == 'refused' and 'is a fine-tuned classifier' in message
    # --export_timm into a folder that does not exist yet, with the extension in capitals: safetensors, no pickle
    exported = root / 'new' / 'folder' / 'encoder.SAFETENSORS'
    assert attempt('finetune', ['--checkpoint', str(world['mae']), '--data', str(world['data']), *EVALUATE, '--mode',
                                'knn', '--output_dir', str(root / 'export_new'), '--export_timm', str(exported)])[0] \
        == 'ran'
    assert 'cls_token' in safetensors.torch.load_file(exported)


def test_a_folder_in_use_by_another_run_is_refused(world):
    folder = world['root'] / 'busy'
    folder.mkdir()
    with open(folder / '.lock', 'a+') as lock:  # as a running train.py holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f'pid {os.getpid()}')
        lock.flush()
        kind, message = attempt('train', ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(folder)])
    assert kind == 'refused' and 'in use by another run' in message
    assert attempt('train', ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(folder)])[0] == 'ran'


def test_a_full_disk_during_a_save_is_one_line_and_the_log_claims_nothing_unsaved(world, monkeypatch):
    folder = world['root'] / 'full_disk'
    argv = ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(folder)]
    assert attempt('train', argv)[0] == 'ran'
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b'x' * 1000)
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    kind, message = attempt('train', [*argv, '--epochs', '2'])
    assert kind == 'refused' and 'No space left on device' in message
    assert not list(folder.glob('*.tmp'))
    assert [json.loads(line)['epoch'] for line in (folder / 'log.jsonl').read_text().splitlines()] == [0]
    monkeypatch.setattr(torch, 'save', real_save)
    assert attempt('train', [*argv, '--epochs', '2'])[0] == 'ran'
    assert [json.loads(line)['epoch'] for line in (folder / 'log.jsonl').read_text().splitlines()] == [0, 1]


def test_a_run_killed_between_its_checkpoint_and_its_log_row_gets_the_row_back(world):
    folder = world['root'] / 'lost_row'
    argv = ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(folder)]
    assert attempt('train', [*argv, '--epochs', '2'])[0] == 'ran'
    rows = (folder / 'log.jsonl').read_text().splitlines()
    (folder / 'log.jsonl').write_text(rows[0] + '\n')  # the last row never reached the disk
    assert attempt('train', [*argv, '--epochs', '2'])[0] == 'ran'  # nothing to train, but the log is mended
    assert (folder / 'log.jsonl').read_text().splitlines() == rows


# What a user sees ----------------------------------------------------------------------------------------------------

def test_sixteen_bit_greyscale_png_loads_as_its_grey_not_white(tmp_path):
    folder = tmp_path / 'train' / 'class_0'
    folder.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(folder / 'grey16.png')  # mid-grey in 16 bits
    image, _ = data.ImageFolderSkippingBroken(tmp_path / 'train', transform=None)[0]
    assert image.mode == 'RGB' and set(np.asarray(image).flatten()) == {128}


def test_progress_shows_loss_in_short_epochs_and_events_get_a_line(world, capfd):
    """Epochs shorter than --log_every (50) still show loss / lr / img/s; a dBOT stage switch, a teacher file, an
    export, a k-NN run and an unreadable image each get a line of their own."""
    root = world['root']
    assert attempt('train', ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(root / 'events_dbot'),
                             '--method', 'dbot', '--epochs', '2'])[0] == 'ran'
    out, err = capfd.readouterr()
    assert 'loss=' in err and 'img_s=' in err
    assert 'stage 1: the student of stage 0 is the frozen teacher now' in out
    assert attempt('train', ['--data', str(world['data']), *PRETRAIN, '--output_dir', str(root / 'events_teacher'),
                             '--method', 'dbot', '--stages', '1', '--teacher', str(world['mae'])])[0] == 'ran'
    assert f'teacher: {world["mae"]}' in capfd.readouterr().out
    exported = root / 'events_export.pth'
    assert attempt('finetune', ['--checkpoint', str(world['mae']), '--data', str(world['data']), *EVALUATE,
                                '--output_dir', str(root / 'events_ft'), '--export_timm', str(exported)])[0] == 'ran'
    out, err = capfd.readouterr()
    assert f"timm's VisionTransformer layout to {exported}" in out and 'loss=' in err
    assert attempt('finetune', ['--checkpoint', str(world['mae']), '--data', str(world['data']), *EVALUATE, '--mode',
                                'knn', '--output_dir', str(root / 'events_knn')])[0] == 'ran'
    assert 'train features' in capfd.readouterr().err  # k-NN shows its progress
    broken = make_image_folder(root / 'events_broken')
    (broken / 'train' / 'class_0' / 'garbage.jpg').write_bytes(b'not an image')
    assert attempt('train', ['--data', str(broken), *PRETRAIN, '--output_dir', str(root / 'events_broken_out')])[0] \
        == 'ran'
    assert '\nwarning: skipping unreadable image' in capfd.readouterr().err


def test_readme_timm_snippet_runs_outside_the_repository(world, tmp_path):
    readme = (Path(__file__).parent / 'docs' / 'evaluation.md').read_text()
    snippet = readme.split('## Loading the encoder into timm')[1].split('```python')[1].split('```')[0]
    (tmp_path / 'output').mkdir()
    shutil.copy(world['mae'], tmp_path / 'output' / 'checkpoint-last.pth')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', snippet], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]


def test_offline_cifar_names_the_folder_torchvision_reads(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError('no network')

    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', offline)
    kind, message = attempt('train', ['--data', 'cifar100', '--data_dir', str(tmp_path), *PRETRAIN, '--output_dir',
                                      str(tmp_path / 'out')])
    assert kind == 'refused' and str(tmp_path / 'cifar-100-python') in message


BOUNDARIES = ('0', '-1', 'nan', 'inf', '-inf', '1e30', '', '0.5', '18446744073709551617')


def test_every_flag_declares_its_values_and_every_boundary_value_is_refused_in_one_line_or_runs(world, capsys):
    """Every flag of the four scripts that takes a value declares it (flags.Range for numbers, flags.text for names
    and paths, or choices), so a flag added later is covered without a case of its own: each boundary value (an
    empty one too) is refused in one line naming the flag, or lies in the declared range and then, for train.py and
    finetune.py, runs to the end (or is refused in one line)."""
    data, root = str(world['data']), world['root']
    scripts = {'train': (train.get_args_parser(), ['--data', data, *PRETRAIN]),
               'finetune': (finetune.get_args_parser(), ['--checkpoint', str(world['mae']), '--data', data, *EVALUATE]),
               'bench': (bench.get_args_parser(), []), 'reproduce': (reproduce.get_args_parser(), ['--data', data])}
    tried = ran = 0
    for script, (parser, base) in scripts.items():
        for action in parser._actions:
            if action.type in (int, float):
                pytest.fail(f'{script}.py --{action.dest} takes a number without a declared range (flags.Range)')
            if action.nargs != 0 and action.type is None and action.choices is None:
                pytest.fail(f'{script}.py --{action.dest} takes a value without a declared type (flags.text)')
            values = (BOUNDARIES if isinstance(action.type, (flags.Range, flags.Ranges)) else
                      ('', ' ') if action.type is flags.text else ())
            flag = action.option_strings[0]
            for value in values:
                argv = base + [flag] + [value] * (action.nargs if isinstance(action.nargs, int) else 1)
                output_dir = root / f'walk-{script}-{action.dest}-{value or "empty"}'
                argv += ['--output_dir', str(output_dir)]
                tried += 1
                try:
                    args = parser.parse_args(argv)
                except SystemExit as e:
                    assert str(e.code).startswith(f'error: argument {flag}') and '\n' not in str(e.code), (argv, e.code)
                    continue
                assert getattr(args, action.dest) is not None, argv
                if script in ('train', 'finetune'):
                    kind, detail = attempt(script, argv)
                    assert kind in ('ran', 'refused'), (argv, detail)
                    ran += kind == 'ran'
                    shutil.rmtree(output_dir, ignore_errors=True)  # 40 runs' checkpoints would fill 5 GB
    with capsys.disabled():
        print(f'\nflags: {tried} boundary values tried, {ran} accepted runs ran to the end')
    assert tried > 400 and ran > 10
