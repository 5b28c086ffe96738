"""The mechanisms a second outside audit found missing (issue 34), each tested over its whole class from the user's
side: writes only where the run owns them, dBOT's stages on resume, data folders read as meant, what is reused keyed
by content, evaluation numbers that are exactly what they say, any undecodable image one skipped file, every stop
signal saving the position, identity compared as meant, no flag accepted and ignored, damaged files named."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, PngImagePlugin

import checkpoints
import data
import finetune
import runtime
import train
from conftest import make_image_folder

HERE = Path(__file__).parent
PRETRAIN = ['--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth',
            '1', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--warmup_epochs', '0', '--vis_every',
            '100']
EVALUATE = ['--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--crop_pct', '1.0']


def pretrain(data_root, out, *extra):
    train.main(train.get_args_parser().parse_args(['--data', str(data_root), '--output_dir', str(out), *PRETRAIN,
                                                   *extra]))


def evaluate(checkpoint, data_root, out, *extra):
    finetune.main(finetune.get_args_parser().parse_args(['--checkpoint', str(checkpoint), '--data', str(data_root),
                                                         '--output_dir', str(out), *EVALUATE, *extra]))


def refused(call, *args):
    """The one-line message of a refusal."""
    with pytest.raises(SystemExit) as e:
        call(*args)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message
    return message


def rows(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp('audit')
    images = make_image_folder(root / 'data', per_class=8)
    pretrain(images, root / 'mae', '--epochs', '1')
    return images, root / 'mae' / 'checkpoint-last.pth'


# 1. Writes go only where the run owns them --------------------------------------------------------------------------

@pytest.mark.parametrize('target', ['checkpoint', 'resume', 'checkpoint-last.pth', 'checkpoint-best.pth', 'log.jsonl',
                                    'features.pt'])
def test_an_export_never_replaces_a_file_the_run_reads_or_keeps(pretrained, tmp_path, target):
    images, checkpoint = pretrained
    out = tmp_path / 'out'
    paths = {'checkpoint': checkpoint, 'resume': tmp_path / 'resumed.pth'}
    export = paths.get(target, out / target)
    resume = ['--resume', str(paths['resume'])] if target == 'resume' else []
    before = checkpoint.read_bytes()
    assert 'would replace a file this run reads or keeps' in refused(
        evaluate, checkpoint, images, out, '--mode', 'linprobe', '--epochs', '1', '--export_timm', str(export), *resume)
    assert checkpoint.read_bytes() == before


def test_saves_refuse_what_is_not_a_regular_file_and_the_lock_is_not_followed(tmp_path):
    os.mkfifo(tmp_path / 'pipe.pth')
    (tmp_path / 'folder.pth').mkdir()
    for name in ('pipe.pth', 'folder.pth'):
        assert 'is not a regular file' in refused(checkpoints.save_checkpoint, {'w': torch.zeros(1)}, tmp_path / name)
    victim, out = tmp_path / 'victim.txt', tmp_path / 'out'
    victim.write_text('keep me')
    out.mkdir()
    (out / '.lock').symlink_to(victim)
    with pytest.raises(SystemExit) as e:
        with runtime.exclusive_output_dir(out):
            pass
    assert '.lock' in str(e.value.code) and victim.read_text() == 'keep me'


def test_resume_into_a_folder_of_another_run_is_refused_and_rewinding_the_same_run_works(pretrained, tmp_path):
    images, _ = pretrained
    pretrain(images, tmp_path / 'a', '--epochs', '2', '--save_epochs', '1')
    pretrain(images, tmp_path / 'b', '--epochs', '1', '--mask_ratio', '0.5')
    before = (tmp_path / 'b' / 'checkpoint-last.pth').read_bytes()
    message = refused(pretrain, images, tmp_path / 'b', '--epochs', '2', '--resume',
                      str(tmp_path / 'a' / 'checkpoint-epoch1.pth'))
    assert 'holds another run' in message and (tmp_path / 'b' / 'checkpoint-last.pth').read_bytes() == before
    pretrain(images, tmp_path / 'a', '--epochs', '2', '--resume', str(tmp_path / 'a' / 'checkpoint-epoch1.pth'))
    assert [row['epoch'] for row in rows(tmp_path / 'a')] == [0, 1]


@pytest.mark.parametrize('name', ['log.jsonl', 'args.json', 'checkpoint-last.pth', 'features.pt'])
@pytest.mark.parametrize('kind', ['link', 'pipe'])
def test_a_run_file_that_is_a_link_or_a_pipe_is_refused_before_anything_is_written(tmp_path, name, kind):
    victim, out = tmp_path / 'victim.txt', tmp_path / 'out'
    victim.write_text('keep me')
    out.mkdir()
    (out / name).symlink_to(victim) if kind == 'link' else os.mkfifo(out / name)
    with pytest.raises(SystemExit) as e:
        with runtime.exclusive_output_dir(out):
            pass
    assert name in str(e.value.code) and victim.read_text() == 'keep me'


def test_exports_refuse_the_runs_own_files_and_folders_early_and_spare_a_file_named_like_a_temporary(pretrained,
                                                                                                    tmp_path):
    images, checkpoint = pretrained
    out = tmp_path / 'out'
    for export in (out / 'args.json', out / 'vis-epoch0000.png'):
        assert 'reads or keeps' in refused(evaluate, checkpoint, images, out, '--mode', 'knn', '--export_timm',
                                           str(export))
    (tmp_path / 'folder').mkdir()
    assert 'not a file' in refused(evaluate, checkpoint, images, out, '--mode', 'knn', '--export_timm',
                                   str(tmp_path / 'folder'))
    shutil.copy(checkpoint, tmp_path / 'model.tmp')
    evaluate(tmp_path / 'model.tmp', images, out, '--mode', 'knn', '--knn_k', '3', '--export_timm',
             str(tmp_path / 'model'))
    assert torch.load(tmp_path / 'model.tmp', weights_only=True).keys() == torch.load(checkpoint,
                                                                                     weights_only=True).keys()


def test_frozen_evaluations_and_training_runs_keep_their_own_folders(pretrained, tmp_path):
    images, checkpoint = pretrained
    assert 'holds a training run' in refused(evaluate, checkpoint, images, checkpoint.parent, '--mode', 'knn')
    evaluate(checkpoint, images, tmp_path / 'knn', '--mode', 'knn', '--knn_k', '3')
    assert 'holds frozen evaluations' in refused(evaluate, checkpoint, images, tmp_path / 'knn', '--mode', 'linprobe',
                                                 '--epochs', '1')


def test_a_refused_run_leaves_no_folder_it_made_and_keeps_the_folders_it_found(pretrained, tmp_path):
    """Refusals inside the run (the data, --resume, a frozen evaluation's data) happen after its folder is made."""
    images, checkpoint = pretrained
    refused(pretrain, tmp_path / 'missing', tmp_path / 'new' / 'run')
    refused(pretrain, images, tmp_path / 'new' / 'run', '--resume', str(tmp_path / 'missing.pth'))
    refused(evaluate, checkpoint, tmp_path / 'missing', tmp_path / 'new' / 'knn', '--mode', 'knn')
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('kept')
    refused(pretrain, tmp_path / 'missing', tmp_path / 'mine' / 'run')
    refused(pretrain, tmp_path / 'missing', tmp_path / 'mine')
    assert sorted(entry.name for entry in (tmp_path / 'mine').iterdir()) == ['.lock', 'notes.txt']
    (tmp_path / 'empty').mkdir()  # reached through a folder the run makes: still a folder it found
    refused(pretrain, tmp_path / 'missing', tmp_path / 'new' / '..' / 'empty')
    assert (tmp_path / 'empty').is_dir() and not (tmp_path / 'new').exists()
    assert 'is a file, not a folder' in refused(pretrain, images, tmp_path / 'mine' / 'notes.txt' / 'run')
    (tmp_path / 'dangling').symlink_to(tmp_path / 'gone')
    assert 'is a symbolic link to' in refused(pretrain, images, tmp_path / 'dangling' / 'run')
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ['dangling', 'empty', 'mine']


def test_a_run_that_locks_a_folder_another_run_has_just_given_up_is_refused(tmp_path, monkeypatch):
    """Run B opens OUT/.lock while run A holds it; A, refused, removes .lock and the folder it made; then B's lock
    succeeds, on a file that is gone. B must not go on into a folder that no longer exists."""
    out, real_flock, run_a = tmp_path / 'new', fcntl.flock, contextlib.ExitStack()
    run_a.enter_context(runtime.exclusive_output_dir(out))
    a_ended = []

    def lock_after_a_gives_up(file, operation):
        if operation & fcntl.LOCK_EX and not a_ended:  # B's attempt: A ends first, refused
            a_ended.append(run_a.__exit__(SystemExit, SystemExit('error: refused'), None))
        return real_flock(file, operation)

    monkeypatch.setattr(fcntl, 'flock', lock_after_a_gives_up)
    with pytest.raises(SystemExit, match='given up by another run as this one started: start this one again'):
        with runtime.exclusive_output_dir(out):
            pass
    assert not out.exists()


def test_only_rank_0_makes_the_output_folder_and_the_others_check_where_it_goes(tmp_path, monkeypatch):
    """Rank 0 removes the folders it made when its run wrote nothing: had another rank made one first, it would not
    know that this run made it. The other ranks still stop on an output folder that cannot be made."""
    monkeypatch.setenv('RANK', '1')
    with runtime.exclusive_output_dir(tmp_path / 'new' / 'run'):
        assert not (tmp_path / 'new').exists()
    with pytest.raises(SystemExit, match='--output_dir /proc/new/run is not writable'):
        with runtime.exclusive_output_dir('/proc/new/run'):
            pass


# 2. dBOT's stages on resume -----------------------------------------------------------------------------------------

def test_a_resumed_dbot_run_keeps_the_stages_it_has_begun(pretrained, tmp_path):
    images, _ = pretrained
    out = tmp_path / 'dbot'
    pretrain(images, out, '--method', 'dbot', '--stage_epochs', '1,1', '--save_epochs', '1')
    stage0 = out / 'checkpoint-epoch1.pth'
    for moved in ('2,1', '2,2'):  # stage 1 began at epoch 1
        assert 'must keep the stages begun' in refused(pretrain, images, out, '--method', 'dbot', '--stage_epochs',
                                                       moved)
    assert 'must keep the stages begun' in refused(pretrain, images, out, '--method', 'dbot', '--epochs', '4')
    pretrain(images, out, '--method', 'dbot', '--stage_epochs', '1,2')  # the current stage longer: followed
    assert [row['stage'] for row in rows(out)] == [0, 1, 1] and all(row['lr'] >= 0 for row in rows(out))
    lengthened = tmp_path / 'lengthened'
    pretrain(images, lengthened, '--method', 'dbot', '--stage_epochs', '2,1', '--resume', str(stage0))
    assert [row['stage'] for row in rows(lengthened)] == [0, 0, 1] and all(row['lr'] >= 0 for row in rows(lengthened))


# 3. Data folders read as the user means them ------------------------------------------------------------------------

def args_for(root):
    return train.get_args_parser().parse_args(['--data', str(root)])


@pytest.mark.parametrize('train_name,val_name', [('train', 'val'), ('training', 'validation'), ('Train', 'Val'),
                                                 ('TRAIN', 'valid')])
def test_split_folders_in_any_usual_name_keep_validation_out_of_training(tmp_path, train_name, val_name):
    root = make_image_folder(tmp_path / 'data')
    (root / 'train').rename(root / f'{train_name}-tmp')
    (root / f'{train_name}-tmp').rename(root / train_name)
    (root / 'val').rename(root / val_name)
    training, validation = data.build_dataset(args_for(root), 'train', None), data.build_dataset(args_for(root), 'val',
                                                                                                None)
    assert all(f'/{train_name}/' in path for path, _ in training.samples)
    assert all(f'/{val_name}/' in path for path, _ in validation.samples) and training.classes == validation.classes
    shutil.rmtree(root / train_name)
    assert 'no train/' in refused(data.build_dataset, args_for(root), 'train', None)


def test_metadata_is_no_class_and_every_image_format_pil_opens_is_listed(tmp_path, capfd):
    root = make_image_folder(tmp_path / 'data', classes=2, per_class=4)
    listed = len(data.build_dataset(args_for(root), 'train', None).samples)
    for folder in ('@eaDir', '.thumbnails', '__MACOSX', '#recycle'):  # NAS, file managers, zip files
        (root / 'train' / folder).mkdir()
        Image.new('RGB', (8, 8)).save(root / 'train' / folder / 'thumb.jpg')
        (root / 'train' / 'class_0' / folder).mkdir()
        Image.new('RGB', (8, 8)).save(root / 'train' / 'class_0' / folder / 'thumb.jpg')
    (root / 'train' / 'class_0' / '._0.jpg').write_bytes(b'\0\5\26\7 AppleDouble')  # macOS resource fork
    (root / 'train' / 'class_0' / 'notes.txt').write_text('not an image')
    for suffix in ('.jfif', '.gif', '.webp', '.tif', '.bmp', '.JPEG'):
        Image.new('RGB', (8, 8)).save(root / 'train' / 'class_1' / f'more{suffix}',
                                      format={'.jfif': 'JPEG', '.JPEG': 'JPEG', '.tif': 'TIFF'}.get(suffix))
    dataset = data.build_dataset(args_for(root), 'train', None)
    assert dataset.classes == ['class_0', 'class_1'] and len(dataset.samples) == listed + 6
    assert '.txt x1' in capfd.readouterr().err


@pytest.mark.parametrize('train_name,val_name', [('train2017', 'val2017'), ('Train ', 'Val.')])
def test_split_names_with_digits_and_punctuation_are_splits(tmp_path, train_name, val_name):
    root = make_image_folder(tmp_path / 'data')
    (root / 'train').rename(root / train_name)
    (root / 'val').rename(root / val_name)
    training = data.build_dataset(args_for(root), 'train', None)
    assert training.classes == ['class_0', 'class_1'] and data.build_dataset(args_for(root), 'val', None) is not None


def test_a_validation_split_or_images_linked_into_both_splits_are_never_trained_on(pretrained, tmp_path):
    images, checkpoint = pretrained
    assert 'is a validation split' in refused(data.build_dataset, args_for(images / 'val'), 'train', None)
    root = tmp_path / 'data'
    shutil.copytree(images, root)
    shutil.rmtree(root / 'val' / 'class_0')
    (root / 'val' / 'class_0').symlink_to(root / 'train' / 'class_0')
    assert 'reached from both' in refused(evaluate, checkpoint, root, tmp_path / 'knn', '--mode', 'knn')
    assert 'reached from both' in refused(pretrain, root, tmp_path / 'pre', '--epochs', '1')


def test_classes_with_unusual_names_are_classes_and_system_folders_are_not(tmp_path):
    root = make_image_folder(tmp_path / 'data', classes=2, per_class=4)
    for name in ('__background__', '#2', '@home', '$5'):
        shutil.copytree(root / 'train' / 'class_0', root / 'train' / name)
    (root / 'train' / 'System Volume Information').mkdir()
    assert data.build_dataset(args_for(root), 'train', None).classes == sorted(
        ['class_0', 'class_1', '__background__', '#2', '@home', '$5'])


def test_two_folders_of_one_split_are_refused(tmp_path):
    root = make_image_folder(tmp_path / 'data')
    shutil.copytree(root / 'train', root / 'Training')
    assert 'keep one' in refused(data.build_dataset, args_for(root), 'train', None)


# 4. What is reused is keyed by content ------------------------------------------------------------------------------

def test_the_features_cache_follows_the_images_not_the_path(pretrained, tmp_path):
    images, checkpoint = pretrained
    root = tmp_path / 'data'
    shutil.copytree(images, root)
    evaluate(checkpoint, root, tmp_path / 'cached', '--mode', 'knn', '--knn_k', '3')
    for i in range(4):  # more validation images at the same path
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(root / 'val' / 'class_1' / f'new{i}.jpg')
    evaluate(checkpoint, root, tmp_path / 'cached', '--mode', 'knn', '--knn_k', '3')
    evaluate(checkpoint, root, tmp_path / 'fresh', '--mode', 'knn', '--knn_k', '3')
    cached, fresh = rows(tmp_path / 'cached')[-1], rows(tmp_path / 'fresh')[0]
    assert cached['val_images'] == fresh['val_images'] == 8 and cached['val_acc1'] == fresh['val_acc1']


def test_a_run_does_not_resume_on_other_data_at_the_same_path(pretrained, tmp_path):
    images, _ = pretrained
    root = tmp_path / 'data'
    shutil.copytree(images, root)
    pretrain(root, tmp_path / 'run', '--epochs', '1')
    Image.new('RGB', (40, 40)).save(root / 'train' / 'class_0' / 'added.jpg')
    assert 'data files' in refused(pretrain, root, tmp_path / 'run', '--epochs', '2')


# 5. An evaluation number is exactly what it says ---------------------------------------------------------------------

def independent_top1(checkpoint, images, mode):
    """Top-1 of a finetune.py checkpoint over the readable validation images, each once, computed here."""
    state = torch.load(checkpoint, weights_only=True)
    model = finetune.Classifier(finetune.ViT(32, 8, **finetune.VIT_SIZES['vit_tiny']), 2, mode, 'cls', 0.01)
    if mode == 'finetune':
        model.encoder.norm = torch.nn.Identity()
    model.load_state_dict(state['model'])
    model.eval()
    transform = data.eval_transform(32)
    correct = count = 0
    for label, folder in enumerate(sorted((images / 'val').iterdir())):
        for path in sorted(folder.iterdir()):
            try:
                image = transform(data.load_rgb(path))
            except OSError:
                continue
            with torch.no_grad():
                correct += int(model(image[None]).argmax() == label)
            count += 1
    return 100 * correct / count, count


def with_unreadable_validation_file(images, root):
    shutil.copytree(images, root)
    (root / 'val' / 'class_0' / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    return root


@pytest.mark.parametrize('mode', ['finetune', 'linprobe'])
def test_validation_counts_each_readable_image_once_under_one_and_two_processes(pretrained, tmp_path, mode):
    images, checkpoint = pretrained
    root = with_unreadable_validation_file(images, tmp_path / 'data')
    common = ['--checkpoint', str(checkpoint), '--data', str(root), *EVALUATE, '--mode', mode, '--epochs', '1',
              '--warmup_epochs', '0']
    evaluate(checkpoint, root, tmp_path / 'one', '--mode', mode, '--epochs', '1', '--warmup_epochs', '0')
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    'finetune.py', *common, '--output_dir', str(tmp_path / 'two')], cwd=HERE, check=True,
                   capture_output=True, timeout=600)
    for out in ('one', 'two'):
        row = rows(tmp_path / out)[-1]
        top1, count = independent_top1(tmp_path / out / 'checkpoint-last.pth', root, mode)
        assert row['val_images'] == count == 4 and row['val_acc1'] == pytest.approx(top1)


@pytest.mark.parametrize('mode', ['knn', 'frozen'])
def test_frozen_evaluations_are_the_same_under_one_and_two_processes(pretrained, tmp_path, mode):
    images, checkpoint = pretrained
    root = with_unreadable_validation_file(images, tmp_path / 'data')
    schedule = ['--epochs', '3'] if mode == 'frozen' else []
    evaluate(checkpoint, root, tmp_path / 'one', '--mode', mode, '--knn_k', '3', *schedule)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    'finetune.py', '--checkpoint', str(checkpoint), '--data', str(root), *EVALUATE, '--mode', mode,
                    '--knn_k', '3', *schedule, '--output_dir', str(tmp_path / 'two')], cwd=HERE, check=True,
                   capture_output=True, timeout=600)
    one, two = rows(tmp_path / 'one')[0], rows(tmp_path / 'two')[0]
    assert one['val_images'] == two['val_images'] == 4 and one['train_images'] == 16
    assert {k: v for k, v in one.items() if k != 'seconds'} == {k: v for k, v in two.items() if k != 'seconds'}


# 6. Any image that cannot be decoded is one skipped file -------------------------------------------------------------

def png_with_text_bomb(path):
    """A valid 8x8 PNG with a zTXt chunk that inflates beyond PIL's text limit (ValueError, not OSError)."""
    Image.new('RGB', (8, 8)).save(path)
    raw = path.read_bytes()
    body = b'Comment\0\0' + zlib.compress(b'a' * 2 * PngImagePlugin.MAX_TEXT_CHUNK)
    chunk = b'zTXt' + body
    chunk = struct.pack('>I', len(body)) + chunk + struct.pack('>I', zlib.crc32(chunk))
    path.write_bytes(raw[:33] + chunk + raw[33:])  # after the signature and IHDR


UNDECODABLE = {
    'truncated.jpg': lambda path: path.write_bytes(b'\xff\xd8\xff\xe0' + b'\0' * 20),
    'empty.png': lambda path: path.write_bytes(b''),
    'text.gif': lambda path: path.write_bytes(b'GIF89a but nothing else'),
    'maxval.ppm': lambda path: path.write_bytes(b'P6 2 2 70000\n' + b'\0' * 24),
    'text_bomb.png': png_with_text_bomb,
    'pipe.jpg': os.mkfifo,  # a named pipe would block its reader forever
}


@pytest.mark.parametrize('pipeline', [[], ['--decode_on_device']])
def test_every_undecodable_image_is_one_skipped_file(tmp_path, capfd, pipeline):
    root = make_image_folder(tmp_path / 'data', per_class=4)
    for name, write in UNDECODABLE.items():
        write(root / 'train' / 'class_0' / name)
    pretrain(root, tmp_path / 'out', '--epochs', '1', '--batch_size', str(8 + len(UNDECODABLE)), *pipeline)  # all drawn
    err = capfd.readouterr().err
    assert rows(tmp_path / 'out')[0]['skipped_images'] == len(UNDECODABLE)
    assert all(f'skipping unreadable image {root / "train" / "class_0" / name}' in err for name in UNDECODABLE)


def test_a_decompression_bomb_is_skipped_by_the_device_decoder_too(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / 'data', per_class=4)
    Image.new('RGB', (300, 300)).save(root / 'train' / 'class_0' / 'bomb.jpg')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 300 * 300 // 3)  # the file is beyond twice the limit
    pretrain(root, tmp_path / 'out', '--epochs', '1', '--decode_on_device')
    assert rows(tmp_path / 'out')[0]['skipped_images'] == 1


# 7. Every way a run is told to stop saves its position ---------------------------------------------------------------

def stop_at_step(monkeypatch, step, action):
    calls, real = [0], train.forward_backward

    def forward_backward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, 'forward_backward', forward_backward)


@pytest.mark.parametrize('signum', runtime.STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_every_stop_signal_saves_the_position(pretrained, tmp_path, monkeypatch, signum):
    images, _ = pretrained
    stop_at_step(monkeypatch, 3, lambda: os.kill(os.getpid(), signum))  # call 1 counts FLOPs: step 1
    pretrain(images, tmp_path, '--epochs', '1')
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['step']) == (0, 2)


def test_a_closed_output_stops_the_run_with_its_position_saved(pretrained, tmp_path):
    images, _ = pretrained
    process = subprocess.Popen([sys.executable, 'train.py', '--data', str(images), '--output_dir', str(tmp_path),
                                *PRETRAIN, '--epochs', '500', '--log_every', '1'], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    process.stdout.readline()  # `train.py | head -1`
    process.stdout.close()
    assert process.wait(timeout=300) == 0
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert checkpoint['epoch'] < 500


def test_an_output_that_cannot_be_written_stops_the_run_with_its_position_saved(pretrained, tmp_path):
    images, _ = pretrained
    with open('/dev/full', 'w') as full:  # `train.py > /dev/full`: every write fails with ENOSPC
        process = subprocess.run([sys.executable, 'train.py', '--data', str(images), '--output_dir', str(tmp_path),
                                  *PRETRAIN, '--epochs', '500'], cwd=HERE, stdout=full, stderr=subprocess.PIPE,
                                 text=True, timeout=300)
    assert process.returncode == 0 and 'Traceback' not in process.stderr
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['epoch'] < 500


def test_a_dead_loader_worker_is_one_line_and_the_position_before_it_is_saved(pretrained, tmp_path, monkeypatch):
    images, _ = pretrained
    real = train.begin_epoch

    def begin_epoch(*args):  # the DataLoader's own words when the kernel kills a worker
        batches = real(*args)
        yield next(batches)
        yield next(batches)
        raise RuntimeError('DataLoader worker (pid(s) 12345) exited unexpectedly')

    monkeypatch.setattr(train, 'begin_epoch', begin_epoch)
    assert 'a data loader worker died' in refused(pretrain, images, tmp_path, '--epochs', '1')
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['step']) == (0, 2)


# 8. Identity compared as meant --------------------------------------------------------------------------------------

def test_the_same_run_resumes_however_its_identity_is_written(pretrained, tmp_path, monkeypatch):
    images, checkpoint = pretrained
    teacher = tmp_path / 'teacher.pth'
    shutil.copy(checkpoint, teacher)
    pretrain(images, tmp_path / 'random', '--method', 'dbot', '--epochs', '2', '--stages', '1', '--save_epochs', '1')
    (tmp_path / 'random' / 'checkpoint-last.pth').unlink()
    pretrain(images, tmp_path / 'random', '--method', 'dbot', '--epochs', '2', '--stages', '1', '--teacher', 'random',
             '--resume', str(tmp_path / 'random' / 'checkpoint-epoch1.pth'))  # the default, written out
    pretrain(images, tmp_path / 'file', '--method', 'dbot', '--epochs', '1', '--stages', '1', '--teacher', str(teacher))
    monkeypatch.chdir(tmp_path)
    pretrain(images, tmp_path / 'file', '--method', 'dbot', '--epochs', '2', '--stages', '1', '--teacher',
             'teacher.pth')  # the same file by a relative path
    assert len(rows(tmp_path / 'file')) == 2
    shutil.move(teacher, tmp_path / 'moved.pth')  # the same file, moved: the run resumes with its new path
    pretrain(images, tmp_path / 'file', '--method', 'dbot', '--epochs', '3', '--stages', '1', '--teacher',
             str(tmp_path / 'moved.pth'))
    assert len(rows(tmp_path / 'file')) == 3


# 9. No flag is accepted and ignored ----------------------------------------------------------------------------------

# A value other than the default for every flag that only some modes read
OTHER_VALUES = dict(epochs='2', warmup_epochs='1', blr='0.001', lr='0.001', min_lr='1e-7', weight_decay='0.01',
                    head_init_std='0.02', seed='1', clip_grad='1.0', resume='x.pth', layer_decay='0.7', drop_path='0.2',
                    aa='rand-m5', reprob='0.3', mixup='0.5', cutmix='0.5', smoothing='0.2', pool='mean', knn_k='10',
                    knn_t='0.1', nb_classes='5')


@pytest.mark.parametrize('mode', sorted(finetune.MODE_DEFAULTS))
def test_every_flag_a_mode_does_not_read_is_refused(pretrained, mode, capsys):
    images, checkpoint = pretrained
    assert set(OTHER_VALUES) == set(finetune.MODE_FLAGS)  # a flag added there needs a value here
    ignored = [flag for flag, modes in finetune.MODE_FLAGS.items() if mode not in modes]
    assert ignored
    for flag in ignored:
        args = finetune.get_args_parser().parse_args(['--checkpoint', str(checkpoint), '--data', str(images),
                                                      '--mode', mode, f'--{flag}', OTHER_VALUES[flag]])
        assert f'--{flag}: --mode {mode} does not use it' in refused(finetune.validate_args, args)


@pytest.mark.parametrize('teacher', ['random', 'FILE', 'clip', 'dino'])
def test_every_teacher_flag_a_teacher_does_not_read_is_refused(pretrained, teacher):
    _, checkpoint = pretrained
    teacher = str(checkpoint) if teacher == 'FILE' else teacher
    method = 'dbot' if teacher in ('random', 'clip') else 'mrmae'
    values = dict(clip_model='ViT-L-14', clip_weights='x.bin', clip_quick_gelu=None, dino_model='vit_small_patch16_224',
                  dino_weights='x.bin', teacher_depth='0')
    for kind, teacher_flags in train.TEACHER_FLAGS.items():
        for flag in teacher_flags:
            if flag not in train.METHODS[method].flags or kind in teacher.split('+'):
                continue
            given = [f'--no-{flag}'] if values[flag] is None else [f'--{flag}', values[flag]]
            args = train.get_args_parser().parse_args(['--method', method, '--teacher', teacher, *given])
            assert f'--{flag}: the teacher' in refused(train.refuse_unused_flags, args)


def test_flags_a_data_set_or_a_method_does_not_read_are_refused(pretrained):
    images, checkpoint = pretrained
    args = train.get_args_parser().parse_args(['--data', str(images), '--data_dir', '/elsewhere'])
    assert '--data_dir' in refused(train.validate_args, args)
    args = finetune.get_args_parser().parse_args(['--checkpoint', str(checkpoint), '--data', str(images),
                                                  '--data_dir', '/elsewhere'])
    assert '--data_dir' in refused(finetune.validate_args, args)
    args = train.get_args_parser().parse_args(['--method', 'dbot', '--no-norm_pix_loss'])
    assert 'norm_pix_loss' in refused(train.refuse_unused_flags, args)


# 10. Damaged or foreign files are named, not trusted -----------------------------------------------------------------

def test_damaged_foreign_and_newer_files_are_named_and_safetensors_load_by_content(pretrained, tmp_path):
    images, checkpoint = pretrained
    raw = bytearray(checkpoint.read_bytes())
    raw[len(raw) // 2] ^= 1
    (tmp_path / 'flipped.pth').write_bytes(raw)
    assert 'CRC-32' in refused(checkpoints.load_checkpoint, tmp_path / 'flipped.pth')
    state = torch.load(checkpoint, weights_only=True)
    torch.save(dict(state, format=checkpoints.FORMAT + 1), tmp_path / 'newer.pth')
    assert 'newer version' in refused(checkpoints.load_checkpoint, tmp_path / 'newer.pth')
    encoder = {k: v.contiguous() for k, v in train.mae.encoder_state_dict(state['model']).items()}
    safetensors.torch.save_file(encoder, tmp_path / 'encoder.pth')  # a .safetensors file under a .pth name
    evaluate(tmp_path / 'encoder.pth', images, tmp_path / 'knn', '--mode', 'knn', '--knn_k', '3')
    assert rows(tmp_path / 'knn')[0]['val_images'] == 4


def test_a_byte_that_is_no_utf8_in_the_log_costs_its_line_not_the_resume(pretrained, tmp_path):
    images, _ = pretrained
    pretrain(images, tmp_path, '--epochs', '1')
    with open(tmp_path / 'log.jsonl', 'ab') as f:
        f.write(b'{"epoch": 7, "note": "\xff\xfe"}\n')
    pretrain(images, tmp_path, '--epochs', '2')
    assert [row['epoch'] for row in rows(tmp_path)] == [0, 1]


def test_a_rank_that_is_no_number_is_one_line(monkeypatch):
    monkeypatch.setenv('RANK', '')
    assert 'RANK' in refused(runtime.init_distributed, 'cpu')


def test_memory_that_runs_out_is_one_line(pretrained, tmp_path, monkeypatch):
    images, _ = pretrained

    def allocate(*args, **kwargs):
        raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can\'t allocate memory: you tried '
                           'to allocate 8589934592 bytes')

    monkeypatch.setattr(train, 'forward_backward', allocate)
    assert 'out of memory' in refused(pretrain, images, tmp_path, '--epochs', '1')


def test_a_path_after_an_equals_sign_starts_at_home(monkeypatch, tmp_path):
    monkeypatch.setenv('HOME', str(tmp_path))
    args = train.get_args_parser().parse_args(['--output_dir=~/runs'])
    assert args.output_dir == str(tmp_path / 'runs')
