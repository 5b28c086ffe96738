"""The training loop end to end on a generated ImageFolder, in-process and on the CPU."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision import transforms

import data
import device_augment
import runtime
import train
from conftest import make_image_folder


def run(image_folder, output_dir, *extra):
    args = train.get_args_parser().parse_args([
        '--data', str(image_folder), '--output_dir', str(output_dir), '--model', 'vit_tiny', '--img_size', '32',
        '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--batch_size', '4', '--epochs', '2',
        '--warmup_epochs', '1', '--num_workers', '0', '--device', 'cpu', '--log_every', '2', *extra])
    train.main(args)
    return [json.loads(line) for line in (output_dir / 'log.jsonl').read_text().splitlines()]


def test_train_writes_checkpoint_log_and_png(image_folder, tmp_path):
    rows = run(image_folder, tmp_path)
    assert [row['epoch'] for row in rows] == [0, 1]
    assert all(row['stage'] == 0 and row['img_per_s'] > 0 and row['loss'] > 0 for row in rows)
    assert rows[0]['lr'] > 0
    assert (tmp_path / 'vis-epoch0001.png').exists()
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert checkpoint['epoch'] == 2 and checkpoint['args']['method'] == 'mae'
    assert {'model', 'optimizer'} <= set(checkpoint)


def test_rerun_in_same_dir_resumes(image_folder, tmp_path, capsys):
    run(image_folder, tmp_path, '--epochs', '1')
    rows = run(image_folder, tmp_path, '--epochs', '2')
    assert 'resumed from' in capsys.readouterr().out
    assert [row['epoch'] for row in rows] == [0, 1]
    # once restored, the checkpoint's weights are not held a second time for the rest of the run
    args = train.get_args_parser().parse_args(['--data', str(image_folder), '--output_dir', str(tmp_path), '--model',
                                               'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim',
                                               '32', '--decoder_depth', '1', '--batch_size', '4', '--epochs', '3',
                                               '--num_workers', '0', '--device', 'cpu'])
    train.validate_args(args)
    resumed = train.set_up(args)
    assert resumed.start_epoch == 2 and not {'model', 'optimizer', 'teacher'} & set(resumed.ckpt)


def test_accumulation_logs_the_loss_of_every_micro_batch(image_folder, tmp_path):
    """The official MAE recipe's --accum_iter: batch 8 x 2 micro-batches is batch 16 in one, on the same images with
    the same masks (the CPU generator draws two 8-row mask noises as one 16-row one), so the logged loss, its terms
    and steps.jsonl must agree; they were 1/K of it when only the last micro-batch's loss was returned."""
    logs = {}
    for batch, accum in ((16, 1), (8, 2), (4, 4)):
        out = tmp_path / f'mae-{batch}x{accum}'
        logs[accum] = run(image_folder, out, '--batch_size', str(batch), '--accum_iter', str(accum), '--epochs', '1')
        windows = [json.loads(line) for line in (out / 'steps.jsonl').read_text().splitlines()]
        assert [w['loss'] for w in windows] == pytest.approx([logs[accum][0]['loss']], rel=1e-6)
    assert logs[2][0]['loss'] == pytest.approx(logs[1][0]['loss'], rel=1e-5)
    assert logs[4][0]['loss'] == pytest.approx(logs[1][0]['loss'], rel=1e-5)
    # MR-MAE's terms (mimicking the MAE encoder just trained): every term covers every micro-batch too
    teacher = str(tmp_path / 'mae-16x1' / 'checkpoint-last.pth')
    rows = {accum: run(image_folder, tmp_path / f'mrmae-{accum}', '--method', 'mrmae', '--teacher', teacher,
                       '--batch_size', str(16 // accum), '--accum_iter', str(accum), '--epochs', '1')[0]
            for accum in (1, 2)}
    terms = [key for key in rows[1] if key.startswith('loss')]
    assert len(terms) == 3 and [rows[2][key] for key in terms] == pytest.approx([rows[1][key] for key in terms],
                                                                                rel=1e-5)


def test_lr_schedule_warmup_then_half_cosine():
    assert train.lr_at(0, 100, 10, 1.0) == 0
    assert train.lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert train.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert train.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_a_warmup_as_long_as_the_run_is_scaled_down_and_announced(image_folder, tmp_path, capsys):
    assert train.warmup_steps(1, 2, 100) == 100  # shorter than the schedule: as asked
    assert train.warmup_steps(10, 2, 100) == 10  # the default 10 on a 2-epoch run: 5 % of its 200 steps
    assert 'warming up over 10 of their 200 steps' in capsys.readouterr().out
    # a short run with the default --warmup_epochs 10 reaches its peak lr and says so, in every stage of dBOT
    rows = run(image_folder, tmp_path, '--method', 'dbot', '--epochs', '2', '--warmup_epochs', '10')
    assert capsys.readouterr().out.count('would never reach its peak') == 2
    peak = 1.5e-4 * 4 / 256  # the default --blr at batch 4; 4 steps per stage, warm-up round(0.2) = 0 steps
    assert [row['lr'] for row in rows] == pytest.approx([train.lr_at(3, 4, 0, peak)] * 2)  # not 3/40 of the peak


def test_weight_decay_as_the_official_pretraining_code_decays_tokens_but_not_biases_or_norms():
    from mae import MAE
    model = MAE(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, decoder_dim=32, decoder_depth=1)
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {'cls_token', 'mask_token', 'blocks.0.attn.qkv.weight'} <= {names[id(p)] for p in decay['params']}
    assert all(p.ndim == 1 for p in no_decay['params'])
    assert {'norm.weight', 'blocks.0.attn.qkv.bias'} <= {names[id(p)] for p in no_decay['params']}
    assert all(names[id(p)] not in ('pos_embed', 'decoder_pos_embed') for p in decay['params'] + no_decay['params'])


def test_min_lr_is_where_the_half_cosine_ends_and_never_above_the_peak(image_folder, tmp_path):
    rows = run(image_folder, tmp_path / 'a', '--warmup_epochs', '0', '--min_lr', '1e-6', '--log_every', '100')
    peak = 1.5e-4 * 4 / 256  # 4 steps per epoch, 8 in all: the last step's lr is logged
    assert [row['lr'] for row in rows] == pytest.approx([train.lr_at(s, 8, 0, peak, 1e-6) for s in (3, 7)])
    assert rows[-1]['lr'] > train.lr_at(7, 8, 0, peak)  # it ends nearer 1e-6 than 0 would be
    with pytest.raises(SystemExit, match='--min_lr 0.001 is above the peak lr'):
        run(image_folder, tmp_path / 'b', '--min_lr', '1e-3')


@pytest.mark.parametrize('flags,message', [
    (['--data', '/nonexistent/folder'], 'no such folder'),
    (['--img_size', '30'], 'not divisible'),
    (['--mask_ratio', '1.0'], r'argument --mask_ratio: 1.0 is outside \(0, 1\)'),
])
def test_bad_input_is_one_clear_line(image_folder, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(image_folder, tmp_path, *flags)


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / 'empty' / 'train' / 'class_0').mkdir(parents=True)
    with pytest.raises(SystemExit, match='no images'):
        run(tmp_path / 'empty', tmp_path / 'out')


def test_device_augmentation_is_a_crop_and_flip_of_the_image():
    torch.manual_seed(0)
    imgs = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    normalised = (imgs / 255 - mean) / std
    # the whole image: kept or flipped
    out = device_augment.random_resized_crop_flip(imgs, 16, mean, std, scale=(1, 1), ratio=(1, 1))
    kept = (out - normalised).flatten(1).abs().amax(dim=1) < 1e-4
    flipped = (out - normalised.flip(-1)).flatten(1).abs().amax(dim=1) < 1e-4
    assert torch.all(kept | flipped) and 10 < flipped.sum() < 54
    crops = device_augment.random_resized_crop_flip(imgs, 8, mean, std)
    assert crops.shape == (64, 3, 8, 8) and crops.min() >= normalised.min() - 1e-4
    torch.manual_seed(1)
    first = device_augment.random_resized_crop_flip(imgs, 8, mean, std)
    torch.manual_seed(1)
    assert torch.equal(first, device_augment.random_resized_crop_flip(imgs, 8, mean, std))


def test_gpu_data_path_trains_on_any_device(image_folder, tmp_path):
    rows = run(image_folder, tmp_path, '--gpu_data')
    assert [row['epoch'] for row in rows] == [0, 1] and all(row['loss'] > 0 for row in rows)


def test_workers_ship_uint8_and_the_device_normalises_as_the_float_pipeline(image_folder):
    """Per image the same draws and the same values as torchvision's float pipeline (ToTensor, Normalize in the
    worker), seeded by (seed, epoch, index)."""
    args = train.get_args_parser().parse_args(['--data', str(image_folder)])
    dataset = data.build_dataset(args, 'train', data.pretrain_transform(32))
    sampler = data.ResumableSampler(dataset, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(3)
    loader = DataLoader(dataset, batch_size=4, sampler=data.ImageSeeds(sampler, 7))
    assert next(iter(loader))[0].dtype == torch.uint8
    imgs, labels = next(iter(data.NormalizedOnDevice(loader, torch.device('cpu'))))
    float_pipeline = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    expected = []
    for index in list(sampler)[:4]:
        runtime.seed_everything(7, 3, index)
        expected.append(float_pipeline(data.load_rgb(dataset.samples[index][0])))
    assert torch.equal(imgs, torch.stack(expected))
    assert labels.tolist() == [dataset.samples[i][1] for i in list(sampler)[:4]]


def stop_at_call(monkeypatch, call):
    """A stop request (what a signal sets) from inside the call-th call of forward_backward in this process."""
    calls, real = [0], train.forward_backward

    def forward_backward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            runtime.request_stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, 'forward_backward', forward_backward)


def test_persistent_workers_give_the_same_losses_as_none_and_resume_exactly(image_folder, tmp_path, monkeypatch):
    """Loader workers live across epochs; each image's draws come from (seed, epoch, index), so 2 workers give the
    losses of 0 workers, and a run stopped mid-epoch 1 continues exactly."""
    expected = [row['loss'] for row in run(image_folder, tmp_path / 'in_process')]
    assert [row['loss'] for row in run(image_folder, tmp_path / 'workers', '--num_workers', '2')] == expected
    stop_at_call(monkeypatch, 7)  # call 1 counts FLOPs; 4 steps per epoch: epoch 1, step 2
    run_stopped = tmp_path / 'stopped'
    assert len(run(image_folder, run_stopped, '--num_workers', '2')) == 1  # stopped in epoch 1, position saved
    assert torch.load(run_stopped / 'checkpoint-last.pth', weights_only=True)['step'] == 2
    monkeypatch.undo()
    runtime.stop_requested = False
    assert [row['loss'] for row in run(image_folder, run_stopped, '--num_workers', '2')] == expected


def steps_log(output_dir):
    return [json.loads(line) for line in (output_dir / 'steps.jsonl').read_text().splitlines()]


def test_steps_log_tiles_every_epoch_and_survives_a_stop(image_folder, tmp_path, monkeypatch):
    """steps.jsonl averages the loss between log points (every 2 of the 4 steps per epoch): its windows tile each
    epoch once, average back to the epoch's loss, and a run stopped at epoch 1, step 1 (with a row from after its
    checkpoint, as a kill would leave) continues them without a gap or a repeat."""
    rows = run(image_folder, tmp_path / 'whole')
    windows = steps_log(tmp_path / 'whole')
    tiles = [(0, 0, 2), (0, 2, 4), (1, 0, 2), (1, 2, 4)]
    assert [(w['epoch'], w['first_step'], w['end_step']) for w in windows] == tiles
    for row in rows:
        assert sum(w['loss'] for w in windows if w['epoch'] == row['epoch']) / 2 == pytest.approx(row['loss'])
    stop_at_call(monkeypatch, 6)  # call 1 counts FLOPs: epoch 1, step 0
    stopped = tmp_path / 'stopped'
    run(image_folder, stopped)
    with open(stopped / 'steps.jsonl', 'a') as f:
        f.write(json.dumps(dict(windows[2], first_step=1)) + '\n')  # logged by a run killed before its checkpoint
    monkeypatch.undo()
    runtime.stop_requested = False
    run(image_folder, stopped)
    resumed = steps_log(stopped)
    assert [(w['epoch'], w['first_step'], w['end_step']) for w in resumed] == [
        (0, 0, 2), (0, 2, 4), (1, 0, 1), (1, 1, 2), (1, 2, 4)]
    assert resumed[4]['loss'] == windows[3]['loss']  # the resumed run continues exactly
    assert (resumed[2]['loss'] + resumed[3]['loss']) / 2 == pytest.approx(windows[2]['loss'])


def mixed_folder(root):
    """JPEGs in colour and grey, a PNG, a CMYK JPEG, and a corrupt file: what the device decoder meets in practice."""
    make_image_folder(root, per_class=8, size=48)
    folder = root / 'train' / 'class_0'
    Image.new('RGB', (40, 56), (200, 30, 90)).save(folder / 'png.png')
    Image.new('CMYK', (50, 40), (10, 200, 30, 0)).save(folder / 'cmyk.jpg')
    (folder / 'corrupt.jpg').write_bytes(b'not an image')
    return root


def test_device_decoding_draws_the_worker_pipelines_boxes(tmp_path):
    """Per image the same crop box and flip as pretrain_transform (same seeds), drawn in the worker from the file's
    header alone: exactly the box drawn from the decoded image (the previous design); only the resize differs from
    the worker pipeline's (tensor vs PIL bicubic), by a few levels of 255 at most."""
    folder = mixed_folder(tmp_path / 'data')
    args = train.get_args_parser().parse_args(['--data', str(folder), '--decode_on_device', '--img_size', '32'])
    workers = data.build_dataset(args, 'train', data.pretrain_transform(32))
    files = data.build_dataset(args, 'train', None, data.ImageFileBytes)
    device_side = data.DecodedOnDevice(None, files, 32, torch.device('cpu'))
    for index, (path, _) in enumerate(files.samples):
        seeds = (0, 5, index)
        data_bytes, _, _, box, _ = files[index, seeds]
        if path.endswith('corrupt.jpg'):
            assert box == data.NO_BOX
            continue
        image = device_side.decode_one(data_bytes, index)
        assert box == data.crop_box(image, seeds), path  # from the header: what the decoded image gives
        got = device_augment.resized_crops_one_by_one([image], [box], 32)[0].float()
        assert (got - workers[index, seeds][0].float()).abs().mean() < 3, path


def test_device_decoding_ships_a_batch_as_one_flat_tensor_and_gives_each_image_its_box(tmp_path):
    """A batch crosses from a worker as one byte tensor with lengths; the device side splits it, decodes and crops
    each image with its box; an unreadable file takes the next readable image (and its box) and is counted."""
    folder = mixed_folder(tmp_path / 'data')
    args = train.get_args_parser().parse_args(['--data', str(folder), '--decode_on_device', '--img_size', '32'])
    files = data.build_dataset(args, 'train', None, data.ImageFileBytes)
    device_side = data.DecodedOnDevice(None, files, 32, torch.device('cpu'))
    indices = list(range(len(files)))
    items = [files[i, (0, 1, i)] for i in indices]
    flat, lengths, labels, _, boxes, seeds = data.as_flat_bytes(items)
    assert flat.ndim == 1 and lengths.tolist() == [len(item[0]) for item in items]
    imgs, got_labels = device_side.batch(flat, lengths, labels, indices, boxes, seeds)
    corrupt = next(i for i, (path, _) in enumerate(files.samples) if path.endswith('corrupt.jpg'))
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    for i in indices:
        source = i + 1 if i == corrupt else i  # the stand-in: the next readable image, with its own box
        image = device_side.decode_one(items[source][0], source)
        box = boxes[source] if boxes[source] != data.NO_BOX else data.crop_box(image, seeds[source])
        expected = device_augment.resized_crops_one_by_one([image], [box], 32)[0]
        assert torch.allclose(imgs[i], (expected.float() / 255 - mean) / std) and got_labels[i] == labels[source]
    assert int(files.unreadable.sum()) == 1


def test_device_decoding_trains_skips_and_counts_bad_files_and_resumes_exactly(tmp_path, monkeypatch):
    folder = mixed_folder(tmp_path / 'data')
    rows = run(folder, tmp_path / 'straight', '--decode_on_device')
    assert [row['skipped_images'] for row in rows] == [1, 1]  # the corrupt file, in each epoch
    expected = [row['loss'] for row in rows]
    assert [row['loss'] for row in run(folder, tmp_path / 'workers', '--decode_on_device', '--num_workers', '2')] \
        == expected
    stop_at_call(monkeypatch, 8)  # call 1 counts FLOPs; 5 steps per epoch: epoch 1, step 2
    assert len(run(folder, tmp_path / 'stopped', '--decode_on_device')) == 1
    monkeypatch.undo()
    assert [row['loss'] for row in run(folder, tmp_path / 'stopped', '--decode_on_device')] == expected


def test_an_images_seeds_reach_the_host_streams_only(monkeypatch):
    """runtime.seeded (each image's augmentation) draws what seed_everything's streams give, leaves the streams outside
    as they were, and never touches an accelerator's generator: on a GPU the masks come from it, and re-seeding it
    with each image's seeds made the next step's masks a function of the last image decoded in the main process."""
    def accelerator_seeded(*args):
        raise AssertionError('seeded() re-seeded an accelerator generator')

    torch.default_generator.manual_seed(5)
    outside = torch.rand(3)
    torch.default_generator.manual_seed(5)
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', accelerator_seeded)
    monkeypatch.setattr(torch.cuda, 'manual_seed', accelerator_seeded)
    with runtime.seeded(0, 1, 2):
        inside = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(torch.rand(3), outside)  # the stream outside continues as if nothing had been drawn
    monkeypatch.undo()
    runtime.seed_everything(0, 1, 2)
    assert torch.equal(inside[0], torch.rand(3)) and (inside[1], inside[2]) == (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    with runtime.seeded(0, 1, 2, torch_only=True):  # the crop boxes of --decode_on_device: torch's draws, the same
        assert torch.equal(inside[0], torch.rand(3))
    assert (np.random.rand(), random.random()) == (np.random.RandomState(7).rand(), random.Random(7).random())
