"""
The one pre-training loop for every method in this repository.

    python train.py --data cifar10                                   # one process, GPU if there is one, else CPU
    torchrun --nproc_per_node 8 train.py --model vit_base ...         # DDP on one node (NCCL on GPU, gloo on CPU)

The defaults are the papers' optimisation recipe (AdamW betas 0.9/0.95, weight decay 0.05, blr 1.5e-4, norm-pix
loss, warmup then half-cosine) on a small model and data set that trains in well under an hour on one GPU:
ViT-Tiny, patch 4, on 32 px CIFAR-10 with a 128-wide, 4-deep decoder. README gives the ImageNet flags.
A method plugs in through the small interface documented at the top of mae.py.
"""

import argparse
import bisect
import fcntl
import io
import itertools
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torchvision import datasets, transforms
from torchvision.utils import make_grid
from tqdm import tqdm

import dbot
import mae
import mcmae
import mrmae

METHODS = {'mae': mae.MAE, 'mrmae': mrmae.MRMAE, 'mcmae': mcmae.MCMAE, 'mrmcmae': mrmae.MRMCMAE,
           'dbot': dbot.DBOT}


def default_workers():
    """Loader workers per process: this machine's cores shared among the processes torchrun starts on it, at most 8
    (beyond that the model, not decoding, is usually the limit), at least 1."""
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def get_args_parser():
    parser = argparse.ArgumentParser('Masked image pre-training', add_help=True)
    parser.add_argument('--method', default='mae', choices=sorted(METHODS))
    # data
    parser.add_argument('--data', default='cifar10',
                        help='cifar10, cifar100, or a folder: an ImageFolder root with train/ (and val/), '
                             'or a folder of class sub-folders')
    parser.add_argument('--data_dir', default='./data', help='where cifar10/cifar100 are downloaded to')
    parser.add_argument('--num_workers', default=default_workers(), type=int,
                        help='loader processes per training process (default: its share of the cores, at most 8)')
    parser.add_argument('--gpu_data', action='store_true',
                        help='decode a small data set (CIFAR, Tiny-ImageNet) once, keep it on the device as uint8 and '
                             'augment it there')
    parser.add_argument('--decode_on_device', action='store_true',
                        help='an image folder of any size (ImageNet): workers only read file bytes; JPEGs are decoded '
                             'in batches on the device (nvJPEG on GPUs), then cropped, flipped and normalised there')
    # model
    parser.add_argument('--model', default='vit_tiny', choices=sorted(mae.VIT_SIZES))
    parser.add_argument('--img_size', default=32, type=int)
    parser.add_argument('--patch_size', default=4, type=int)
    parser.add_argument('--decoder_dim', default=128, type=int, help='paper (ImageNet): 512')
    parser.add_argument('--decoder_depth', default=4, type=int, help='paper (ImageNet): 8')
    parser.add_argument('--decoder_heads', default=4, type=int, help='paper (ImageNet): 16')
    parser.add_argument('--mask_ratio', default=0.75, type=float)
    parser.add_argument('--norm_pix_loss', default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument('--drop_path', default=0.0, type=float, help='in encoder and decoder (dBOT base: 0.2)')
    # teachers (MR-MAE, dBOT) and stages (dBOT)
    parser.add_argument('--teacher', default=None,
                        help='mrmae: clip+dino (default), clip, dino, or ViT files trained here, joined by "+"; '
                             'dbot: random (default: a frozen copy of the student\'s initialisation) or a ViT '
                             'checkpoint file (ours, timm, official MAE or DINO layout) as the first teacher')
    parser.add_argument('--clip_model', default='ViT-B-16', help='open_clip model name of the CLIP teacher')
    parser.add_argument('--clip_weights', default=None, help='its weights: a local open_clip file, or a tag')
    parser.add_argument('--clip_quick_gelu', default=True, action=argparse.BooleanOptionalAction,
                        help="OpenAI's CLIP weights (the paper's) need QuickGELU; turn off for LAION/DataComp ones")
    parser.add_argument('--dino_model', default='vit_base_patch16_224.dino', help='timm model name of the DINO teacher')
    parser.add_argument('--dino_weights', default=None, help='its weights: a local timm file, or "hub"')
    parser.add_argument('--mimic_weight', default=1.0, type=float, help='mrmae: weight of the mimic loss')
    parser.add_argument('--focused_mimic', action='store_true',
                        help='mrmae: pick the visible tokens by the teacher\'s [CLS] attention (our reading)')
    parser.add_argument('--fusion_layers', default=0, type=int,
                        help='mrmae: mimic from a learned mix of the last K encoder layers (our reading)')
    parser.add_argument('--teacher_depth', default=None, type=int,
                        help='dbot random teacher: keep only its first N blocks (0: the large/huge recipe)')
    parser.add_argument('--stages', default=None, type=int,
                        help='dbot: bootstrapping stages sharing --epochs evenly (default 2; 1 for other methods)')
    parser.add_argument('--stage_epochs', default=None, type=lambda s: [int(n) for n in s.split(',')],
                        help='epochs of each stage, e.g. 800,800 (overrides --epochs)')
    # optimisation
    parser.add_argument('--epochs', default=None, type=int, help='in all stages together (default 200)')
    parser.add_argument('--warmup_epochs', default=10, type=int, help='at the start of every stage')
    parser.add_argument('--batch_size', default=256, type=int, help='per process')
    parser.add_argument('--accum_iter', default=1, type=int, help='micro-batches per optimizer step')
    parser.add_argument('--blr', default=1.5e-4, type=float, help='lr = blr * effective batch / 256')
    parser.add_argument('--lr', default=None, type=float, help='absolute lr; overrides --blr')
    parser.add_argument('--weight_decay', default=0.05, type=float)
    parser.add_argument('--betas', default=(0.9, 0.95), type=float, nargs=2, help="AdamW's betas (MAE: 0.9 0.95)")
    parser.add_argument('--opt_eps', default=1e-8, type=float, help="AdamW's eps")
    parser.add_argument('--clip_grad', default=None, type=float, help='max gradient norm (none by default)')
    parser.add_argument('--skip_nonfinite', default=0, type=int,
                        help='skip up to N steps per epoch whose loss is NaN/inf (costs a host sync per step)')
    parser.add_argument('--seed', default=0, type=int)
    # system and output
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default=None, choices=['bf16', 'fp32'],
                        help='bf16 autocast or plain fp32 (default: bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--output_dir', default='./output')
    parser.add_argument('--resume', default='', help='checkpoint to resume from '
                        '(default: OUTPUT_DIR/checkpoint-last.pth when it exists)')
    parser.add_argument('--log_every', default=50, type=int, help='steps between progress updates (host syncs)')
    parser.add_argument('--vis_every', default=10, type=int, help='epochs between reconstruction PNGs')
    parser.add_argument('--save_epochs', default=[], type=lambda s: [int(n) for n in s.split(',')],
                        help='also keep the checkpoint after these epochs, e.g. 2,4,8 (checkpoint-epochN.pth), for '
                             'evaluating the encoder along the schedule')
    return parser


def fail(message):
    """Bad input ends the run with one line naming the problem, not a traceback."""
    raise SystemExit(f'error: {" ".join(str(message).split())}')


# -----------------------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is a world of one.

def init_distributed(device_name):
    """-> (rank, world_size, device). NCCL for GPUs, gloo for CPUs."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(device_name)
    store, rank, world_size = next(dist.rendezvous('env://'))
    # torchrun --max-restarts starts every attempt's workers on the same store: without a prefix of its own, an attempt
    # can read the addresses a dead attempt's workers left there and fail to connect (seen with gloo).
    store = dist.PrefixStore(f'attempt{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}/', store)
    if device_name.startswith('cuda'):
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo', store=store, rank=rank, world_size=world_size)
    return rank, world_size, device


def all_reduce_mean(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def means_over_ranks(sums, count):
    """{name: summed loss} -> {name: its mean over count micro-batches and every rank}: stacked, so that a log point
    costs one collective and one read back however many loss terms a method has."""
    means = all_reduce_mean(torch.stack(list(sums.values())) / count)
    return dict(zip(sums, means.tolist()))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def max_over_ranks(value):
    """The largest of the ranks' values (a number, bool, list or tensor; element-wise): one decision that every rank
    shares. -> a float, or a list of floats."""
    value = torch.as_tensor(value, dtype=torch.float64)
    if dist.is_initialized():
        value = value.to('cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def gather_from_ranks(obj):
    """Every rank's obj (any picklable value), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def rng_states(device):
    """Every RNG a step draws from, in a form torch.load(weights_only=True) reads back."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states = dict(torch=torch.get_rng_state(), python=random.getstate(),
                  numpy=(name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss))
    if device.type == 'cuda':  # the masks are drawn on the GPU
        states['cuda'] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states, device):
    torch.set_rng_state(states['torch'])
    random.setstate(states['python'])
    name, keys, position, has_gauss, gauss = states['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    # A checkpoint written on a CPU holds no CUDA state: the CUDA stream then stays as this epoch's seeding left it.
    # (A GPU's state means nothing to a CPU: the masks come from the CPU stream, restored above.)
    if device.type == 'cuda' and 'cuda' in states:
        torch.cuda.set_rng_state(states['cuda'], device)


def rank_positions(device, **sums):
    """Where every rank stands in an epoch that a signal interrupts: each rank's own RNG states (its masks, drop-path
    and crops differ from the other ranks') and partial loss sums, gathered in rank order for the checkpoint."""
    sums = {name: {k: v.cpu() for k, v in value.items()} if isinstance(value, dict) else value.cpu()
            for name, value in sums.items()}
    return gather_from_ranks(dict(rng_state=rng_states(device), **sums))


def rank_position(checkpoint, rank, world_size, path):
    """This rank's part of rank_positions() in a checkpoint. An epoch cut at a step continues only on as many
    processes as it began with: each one's share of the epoch and its random streams belong to that split."""
    positions = checkpoint.get('ranks') or [checkpoint]  # checkpoints of one process before per-rank positions
    if len(positions) != world_size:
        fail(f'{path} stopped mid-epoch in a run of {len(positions)} process(es); continue it with '
             f'{len(positions)} (torchrun --nproc_per_node {len(positions)}), not {world_size}')
    return positions[rank]


def seed_everything(*keys):
    """Seed torch, numpy (timm's Mixup) and Python's random (timm's RandAugment) from a tuple of ints: every (seed,
    epoch, rank) gets its own streams, so a resumed run draws what an uninterrupted one would."""
    seed = hash(keys) % 2 ** 32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextmanager
def seeded(*keys):
    """Draws inside come from the streams seed_everything(*keys) starts; the states outside are left as they were (a
    loader without worker processes augments in the main process, whose streams draw the masks)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(*keys)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


# How often ranks agree on a signal, in seconds: torchrun sends SIGKILL 30 s after SIGTERM, and rank 0 still has to
# write the checkpoint after the vote.
STOP_VOTE_SECONDS = 5.0


class StopVote:
    """Whether a signal ends the run after a step, decided alike on every rank. One process reads its own flag after
    every step (no device work). Ranks must stop at the same step, so in DDP they vote: one all-reduce of (any signal,
    seconds since the last vote), whose result tells every rank the same step time and hence the same next vote,
    about STOP_VOTE_SECONDS later. A vote is a host sync; one every few seconds costs nothing measurable at any model
    size, and a signal stops the run within a few seconds plus one step. A signal in an epoch's last step lets the
    epoch end with its usual checkpoint; the next epoch's first vote stops the run."""

    def __init__(self, first_step, world_size):
        self.world_size = world_size
        self.last_step, self.last_time, self.next_vote = first_step, time.perf_counter(), first_step + 1

    def stops_after(self, step, steps_per_epoch):
        done = step + 1
        if done >= steps_per_epoch:
            return False
        if self.world_size == 1:
            return stop_requested
        if done < self.next_vote:
            return False
        now = time.perf_counter()
        signalled, elapsed = max_over_ranks([stop_requested, now - self.last_time])
        seconds_per_step = elapsed / (done - self.last_step)
        self.next_vote = done + max(1, int(STOP_VOTE_SECONDS / max(seconds_per_step, 1e-9)))
        self.last_step, self.last_time = done, now
        return bool(signalled)


@contextmanager
def stop_on_signals():
    """SIGTERM (pre-emption) and SIGINT (Ctrl-C) set stop_requested instead of killing the process, so that the loop
    can checkpoint its exact position and exit 0; the previous handlers come back afterwards."""
    global stop_requested
    stop_requested = False
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def exclusive_output_dir(path):
    """One run per output folder. Every rank checks that the folder is writable (so that all of them stop with the
    message); rank 0 holds an advisory lock on OUTPUT_DIR/.lock while the run lives, which the OS releases if the
    process dies, so a second run on the folder is refused instead of interleaving its log and checkpoints."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f'--output_dir {path} is not writable ({e})')
    if int(os.environ.get('RANK', 0)) != 0:
        yield
        return
    with open(path / '.lock', 'a+') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            fail(f'--output_dir {path} is in use by another run ({lock.read().strip() or "unknown process"}): wait '
                 f'for it to end, or give another --output_dir')
        lock.truncate(0)
        lock.write(f'pid {os.getpid()} on {os.uname().nodename}')
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def unreadable_data_in_one_line():
    """A data set without one readable image fails in a loader worker; say so in one line wherever it surfaces."""
    try:
        yield
    except NoReadableImage as e:  # from a worker, its message ends the DataLoader's account of the worker's traceback
        fail(str(e).strip().splitlines()[-1].removeprefix('NoReadableImage: '))


def run_identity(args, keys):
    """The flags that make a checkpoint this run's (args: a Namespace or a checkpoint's dict); a data folder by its
    absolute path."""
    args = args if isinstance(args, dict) else vars(args)
    identity = {key: args.get(key) for key in keys}
    if 'data' in identity and identity['data'] not in ('cifar10', 'cifar100'):
        identity['data'] = str(Path(identity['data']).resolve())
    return identity


def refuse_another_run(saved, current, path):
    """Resuming a checkpoint of another run would mix two runs in one log and one model: say which flag differs."""
    for key, value in current.items():
        if saved.get(key) != value:
            fail(f'{path} belongs to another run: its --{key} is {saved.get(key)}, this run\'s is {value}. Continue it '
                 f'with its own flags, or start afresh with another --output_dir')


PRETRAIN_IDENTITY = ('method', 'model', 'img_size', 'patch_size', 'data')


# -----------------------------------------------------------------------------------------------------------------
# Data

def pretrain_transform(img_size):
    """MAE §A.1: RandomResizedCrop (scale 0.2-1, bicubic) and horizontal flip are the only augmentations. Loader
    workers stop at uint8 tensors (a quarter of float32's bytes to ship and pin); normalize_on_device finishes."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor()])


class NormalizedOnDevice:
    """A loader of uint8 batches -> float batches on the device, normalised there: ToTensor's /255 and Normalize's
    (x - mean) / std, the same operations in the same order, so the values are those of the float pipeline."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)  # now, not at the first batch: the caller decides what RNG state it sees
        return (self.normalize(imgs, labels) for imgs, labels in batches)

    def normalize(self, imgs, labels):
        imgs = imgs.to(self.device, non_blocking=True).float().div_(255)
        return imgs.sub_(self.mean).div_(self.std), labels.to(self.device, non_blocking=True)


def eval_transform(img_size):
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def load_rgb(path):
    """An image file as 8-bit RGB. PIL's convert('RGB') clips 16-bit greyscale (modes I;16 and I) to white: scale
    those to 8 bits first."""
    with Image.open(path) as img:
        if img.mode.startswith('I'):
            img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
        return img.convert('RGB')


class ImageFolderSkippingBroken(datasets.ImageFolder):
    """An ImageFolder that replaces an unreadable image (corrupt, truncated) by the next readable one, with a warning
    naming the file. The count lives in shared memory, one slot per loader worker, so that it reaches log.jsonl."""

    def __init__(self, root, transform):
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skipped = torch.zeros(1024, dtype=torch.int64).share_memory_()

    def __getitem__(self, key):
        """key: an index, or (index, seeds) from ImageSeeds: the image's augmentation then draws from its own seeds."""
        index, seeds = key if isinstance(key, tuple) else (key, None)
        with seeded(*seeds) if seeds is not None else nullcontext():
            return self.first_readable(index)

    def first_readable(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return super().__getitem__(i)
            except OSError as e:  # PIL's unidentified and truncated images raise OSErrors
                worker = get_worker_info()
                self.skipped[worker.id + 1 if worker else 0] += 1
                # on a line of its own, not glued to the progress bar's
                print(f'\nwarning: skipping unreadable image {self.samples[i][0]} ({e})', file=sys.stderr)
        raise NoReadableImage(f'no readable image in {self.root}: every file failed to decode')


class NoReadableImage(RuntimeError):
    """Raised in a loader worker, re-raised by the DataLoader in the main process, and reported there in one line."""


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can begin an epoch part-way, for a run that a signal stopped mid-epoch."""
    start = 0  # samples of this rank's share to skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


class ImageFileBytes(ImageFolderSkippingBroken):
    """--decode_on_device: a worker reads each file's bytes and nothing else (no decoding, no augmentation)."""

    def __getitem__(self, key):  # key: (index, seeds) from ImageSeeds
        index, seeds = key
        path, label = self.samples[index]
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), label, index, seeds


def as_lists(batch):
    """collate_fn for ImageFileBytes: files differ in length, so the batch stays a list of byte tensors."""
    data, labels, indices, seeds = zip(*batch)
    return list(data), torch.tensor(labels), indices, seeds


class DecodedOnDevice:
    """--decode_on_device: batches of file bytes -> augmented, normalised images on the device, in the sampler's
    order. JPEGs are decoded as one batch (torchvision.io.decode_jpeg; nvJPEG on GPUs); a file that decoder cannot
    take (PNG, CMYK or 16-bit images, a corrupt file) is decoded alone on the CPU (PIL), and one that nothing can
    read is replaced by the batch's next image and counted, as the worker pipeline does. Each image is then cropped,
    resized and flipped with the worker pipeline's RandomResizedCrop and flip draws (the same seeds: the same boxes;
    torchvision's tensor resize instead of PIL's, antialiased) and normalised as NormalizedOnDevice does."""

    def __init__(self, loader, dataset, img_size, device):
        self.loader, self.dataset, self.img_size, self.device = loader, dataset, img_size, device
        self.normalized = NormalizedOnDevice(loader, device)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)  # now: the caller decides what RNG state it sees
        return (self.batch(*batch) for batch in batches)

    def batch(self, data, labels, indices, seeds):
        images = self.decode(data, indices)
        readable = [i for i, image in enumerate(images) if image is not None]
        if not readable:
            raise NoReadableImage(f'no readable image among {[self.dataset.samples[i][0] for i in indices]}')
        stand_in = {i: readable[bisect.bisect_left(readable, i) % len(readable)] for i in range(len(images))}
        crops = torch.stack([self.augment(images[stand_in[i]], seeds[stand_in[i]]) for i in range(len(images))])
        return self.normalized.normalize(crops, labels[[stand_in[i] for i in range(len(images))]])

    def decode(self, data, indices):
        try:
            return list(torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one file the batched decoder cannot take: each alone
            return [self.decode_one(bytes_, index) for bytes_, index in zip(data, indices)]

    def decode_one(self, data, index):
        try:
            return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            image = load_rgb(io.BytesIO(data.numpy().tobytes()))
            return transforms.functional.pil_to_tensor(image).to(self.device, non_blocking=True)
        except OSError as e:  # PIL's unidentified and truncated images
            self.dataset.skipped[0] += 1
            print(f'\nwarning: skipping unreadable image {self.dataset.samples[index][0]} ({e})', file=sys.stderr)
            return None

    def augment(self, image, seeds):
        with seeded(*seeds):  # the draws of pretrain_transform for this image
            top, left, height, width = transforms.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
            flip = torch.rand(1) < 0.5
        crop = transforms.functional.resized_crop(image, top, left, height, width, [self.img_size] * 2,
                                                  transforms.InterpolationMode.BICUBIC, antialias=True)
        return crop.flip(-1) if flip else crop


def ignore_stop_signals(worker_id):
    """worker_init_fn: loader workers leave SIGTERM and SIGINT to the main process. A signal sent to the whole process
    group (Ctrl-C in a terminal, a scheduler pre-empting a job) would otherwise kill them first, and the main process
    would die of their deaths before it checkpoints; it stops them itself when it exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ImageSeeds:
    """A sampler's indices, each with the seeds of that image's augmentation in this epoch, (--seed, epoch, index):
    the draws depend on no worker, worker count or starting point, so loader workers can live across epochs
    (persistent_workers) and a resumed run still augments every image as an uninterrupted one."""

    def __init__(self, sampler, seed):
        self.sampler, self.seed = sampler, seed

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return ((index, (self.seed, self.sampler.epoch, index)) for index in self.sampler)


def random_resized_crop_flip(images, size, mean, std, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop + horizontal flip + normalisation with mean and std ((1, 3, 1, 1) tensors on the images'
    device) for a whole uint8 batch (B, 3, H, W) on its device: per image a box of area scale*H*W and log-uniform
    aspect ratio at a uniform position, flipped with probability 1/2, resampled bicubically through one affine grid.
    Unlike torchvision, which re-draws a box that does not fit, a box is clamped to the image. Nothing here waits for
    the device: no value comes back to the host and no tensor is made from host data."""
    B, _, H, W = images.shape
    device = images.device
    area = H * W * torch.empty(B, device=device).uniform_(*scale)
    aspect = torch.empty(B, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt().clamp(max=W), (area / aspect).sqrt().clamp(max=H)
    cx = w / 2 + torch.rand(B, device=device) * (W - w)
    cy = h / 2 + torch.rand(B, device=device) * (H - h)
    flip = torch.where(torch.rand(B, device=device) < 0.5, -1.0, 1.0)
    zero = torch.zeros(B, device=device)
    theta = torch.stack([torch.stack([w / W * flip, zero, 2 * cx / W - 1], dim=1),  # output -> input coordinates
                         torch.stack([zero, h / H, 2 * cy / H - 1], dim=1)], dim=1)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    out = F.grid_sample(images.float() / 255, grid, mode='bicubic', padding_mode='border', align_corners=False)
    return (out.clamp(0, 1) - mean) / std


class DeviceImages:
    """--gpu_data: a small data set (CIFAR, Tiny-ImageNet: images of one size) decoded once into a uint8 tensor on the
    device, augmented there batch by batch; no JPEG decoding in the loop. Iterates like the DataLoader it replaces,
    in the order of the same (resumable, distributed) sampler."""

    def __init__(self, dataset, sampler, batch_size, img_size, device, num_workers):
        decoded = DataLoader(dataset, batch_size=256, num_workers=num_workers, worker_init_fn=ignore_stop_signals)
        try:
            images, labels = zip(*decoded)
        except RuntimeError as e:  # default_collate cannot stack images of different sizes
            fail(f'--gpu_data needs images of one size, as in CIFAR or Tiny-ImageNet ({" ".join(str(e).split())})')
        self.images, self.labels = torch.cat(images).to(device), torch.cat(labels).to(device)
        self.sampler, self.batch_size, self.img_size = sampler, batch_size, img_size
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        """The epoch's order goes to the device once, here, at the start of the epoch; the batches follow lazily."""
        ids = torch.tensor(list(self.sampler), device=self.images.device)
        starts = range(0, len(ids) - self.batch_size + 1, self.batch_size)
        return (self.batch(ids[start:start + self.batch_size]) for start in starts)

    def batch(self, ids):
        return random_resized_crop_flip(self.images[ids], self.img_size, self.mean, self.std), self.labels[ids]


def build_dataset(args, split, transform, folder_class=None):
    """The `split` ('train' or 'val') of --data, or None when a folder has no such split. Images load as RGB
    (torchvision's default loader converts greyscale JPEGs)."""
    if args.data in ('cifar10', 'cifar100'):
        cifar = datasets.CIFAR10 if args.data == 'cifar10' else datasets.CIFAR100
        try:
            return cifar(args.data_dir, train=split == 'train', transform=transform, download=True)
        except OSError as e:  # URLError is an OSError: no network, or the server refused
            fail(f'could not download {args.data} into {args.data_dir} ({e}). Without a network, extract the '
                 f'python version of the data set (https://www.cs.toronto.edu/~kriz/cifar.html) so that '
                 f'{Path(args.data_dir) / cifar.base_folder} holds its batches, or pass --data FOLDER')
    root = Path(args.data)
    if not root.is_dir():
        fail(f'--data {root}: no such folder (expected cifar10, cifar100, or an ImageFolder root)')
    folder = root / split
    if not folder.is_dir():
        if split != 'train':
            return None
        if (root / 'val').is_dir():
            fail(f'--data {root} holds val/ but no train/: training on the validation images would make every later '
                 f'evaluation meaningless; add train/')
        folder = root  # a plain folder of class sub-folders
    try:
        return (folder_class or ImageFolderSkippingBroken)(folder, transform=transform)
    except (FileNotFoundError, OSError) as e:
        fail(f'--data {root}: no images found in {folder} ({e})')


# -----------------------------------------------------------------------------------------------------------------
# Optimisation

def param_groups(model, weight_decay):
    """Weight decay on weight matrices and conv kernels only: not on biases, norms or the cls/mask tokens
    (the official MAE code does decay the tokens; either is fine per the paper)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith('token') else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(model, args, lr):
    """AdamW (MAE §A.1: betas 0.9, 0.95). Fused on every device: one kernel per step, and its step count lives on the
    device, so the update never reads a value back to the host."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=tuple(args.betas), eps=args.opt_eps,
                             fused=True)


def broadcast_parameters(module):
    """Give every rank rank 0's weights: DDP does it once when it wraps a model, not after a re-initialisation."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def warmup_steps(warmup_epochs, epochs, steps_per_epoch, announce=True):
    """Linear warm-up over --warmup_epochs, unless that is not shorter than the schedule it starts (a short run with
    the default 10): the lr would never reach its peak. Then the warm-up is 5 % of the schedule, MAE's ratio (40 of
    800 pre-training epochs, 5 of 100 fine-tuning), and the run says so."""
    if warmup_epochs < epochs:
        return warmup_epochs * steps_per_epoch
    steps = round(0.05 * epochs * steps_per_epoch)
    if announce:
        print(f'note: --warmup_epochs {warmup_epochs} is not shorter than the {epochs} epoch(s) it would warm up, so '
              f'the lr would never reach its peak: warming up over {steps} of their {epochs * steps_per_epoch} steps '
              f'(5 %, MAE\'s ratio) instead')
    return steps


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Linear warmup, then half-cosine to min_lr (0 in pre-training), updated every optimizer step (MAE §A.1)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def forward_backward(model, teacher, imgs, mask_ratio, autocast, share=1.0):
    """One micro-batch: the frozen teacher's targets without autograd, then the model's loss and its gradients, those
    weighted by the micro-batch's share of the optimizer step (1 / --accum_iter).
    no_grad, not inference_mode: a compiled student may save the targets for its backward pass (dBOT whitens them
    inside the graph), and autograd refuses to save inference tensors."""
    with torch.no_grad(), autocast:
        targets = teacher(imgs) if teacher is not None else None
    with autocast:
        loss, _, _ = model(imgs, mask_ratio, targets=targets)
    (loss * share).backward()
    return loss


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints, logs, figures

def save_checkpoint(state, path, write=None):
    """Write to a temp file, fsync, then rename: a kill during the save leaves the previous file intact. A failed
    write (a full disk) removes the temp file and ends the run in one line; the previous file still stands.
    write(state, file) serialises (torch.save's pickle unless told otherwise)."""
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            (write or torch.save)(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            fail(f'could not write {path} ({" ".join(str(e).split())[:200]}); the previous {path.name}, if any, is '
                 f'intact: make room (or fix the folder) and rerun the same command')
        raise


def load_checkpoint(path, required_keys=()):
    try:
        checkpoint = mae.load_weights_file(path)
    except Exception as e:  # truncated, foreign or missing: one line, whatever torch raised
        fail(f'cannot read checkpoint {path}: {" ".join(str(e).split())[:300]}')
    missing = [key for key in required_keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        fail(f'{path} is not a checkpoint of this script (it has no {", ".join(missing)})')
    return checkpoint


def load_state(module, state, source):
    """load_state_dict, with a mismatch reported in one line that names the keys and shapes that disagree."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f'{source} does not fit this run: {" ".join(str(e).split())[:800]}')


def restore_log(log_path, covered, last_row=None):
    """Make a log (log.jsonl, steps.jsonl) say what the checkpoint covers, no more and no less: rows it does not cover
    (`covered(row)` false: a run killed after logging) go; the checkpoint's own last row, lost if a run died between
    the two writes, comes back; a line that is no log row (a write cut short, a hand edit) is dropped with a warning."""
    rows = []
    for number, line in enumerate(log_path.read_text().splitlines() if log_path.exists() else [], 1):
        try:
            row = json.loads(line)
            keep = covered(row)
        except (ValueError, KeyError, TypeError):
            print(f'warning: dropping line {number} of {log_path}, not a log row: {line[:60]!r}', file=sys.stderr)
            continue
        rows += [row] if keep else []
    if last_row is not None and last_row['epoch'] not in {row['epoch'] for row in rows}:
        rows.append(last_row)
    log_path.write_text(''.join(json.dumps(row) + '\n' for row in rows))


def check_finite(nonfinite_step, epoch, out):
    """Stop every rank when any saw a non-finite loss (tracked on the device, read here at log points)."""
    step = int(max_over_ranks(nonfinite_step))
    if step >= 0:
        fail(f'the loss became NaN or infinite in epoch {epoch} at step {step} (usually too high a learning rate for '
             f'this batch size: lower --blr, or set --clip_grad; --skip_nonfinite N skips isolated bad batches); the '
             f'last good checkpoint is {out / "checkpoint-last.pth"}')


def save_figure(rows, caption, path, min_size=128):
    """Rows of images in [0, 1] as one PNG grid, upscaled to at least min_size px, with a caption underneath."""
    imgs = torch.cat(rows).float().cpu()
    scale = max(1, math.ceil(min_size / imgs.shape[-1]))
    imgs = F.interpolate(imgs, scale_factor=scale, mode='nearest')
    grid = make_grid(imgs, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    grid = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    figure = Image.new('RGB', (grid.shape[1], grid.shape[0] + 24), 'white')
    figure.paste(Image.fromarray(grid), (0, 0))
    ImageDraw.Draw(figure).text((4, grid.shape[0] + 6), caption, fill='black')
    figure.save(path)


# -----------------------------------------------------------------------------------------------------------------
# Speed accounting (MFU on GPU)

def fused_attention_flops(query, key, value, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, *args,
                          out_shape=None, **kwargs):
    """nn.MultiheadAttention's fused inference kernel (open_clip's CLIP takes it in eval mode without autograd): the
    q, k, v and output projections, and the two attention matmuls."""
    (batch, queries, width), keys = query, key[1]
    projections = 2 * batch * width * width * (2 * queries + 2 * keys)
    return projections + 4 * batch * queries * keys * width


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# Kernels torch.utils.flop_counter has no formula for, which would otherwise count as zero FLOPs.
FLOP_FORMULAS = {torch.ops.aten._native_multi_head_attention: fused_attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}


def count_flops(fn):
    """The FLOPs of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention), on every
    device and through every attention kernel."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_image(model, teacher, args, device):
    """Training FLOPs of one image: the model's forward and backward plus the teacher's forward, counted on a batch of
    two. The count draws its masks from a forked RNG: training draws the same whether or not it counts."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        imgs = torch.randn(2, 3, args.img_size, args.img_size, device=device)
        flops = count_flops(lambda: forward_backward(model, teacher, imgs, args.mask_ratio, nullcontext()))
    model.zero_grad(set_to_none=True)
    return flops / imgs.shape[0]


def measured_peak_flops(device, n=8192, reps=20):
    """What this card's bf16 matmul really reaches: the honest denominator for MFU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3)


# -----------------------------------------------------------------------------------------------------------------

METHOD_FLAGS = ('teacher', 'teacher_depth', 'stages', 'stage_epochs', 'clip_model', 'clip_weights', 'clip_quick_gelu',
                'dino_model', 'dino_weights', 'mimic_weight', 'focused_mimic', 'fusion_layers')


def refuse_unused_flags(args):
    """A flag the method ignores would silently change nothing: say so instead."""
    defaults = get_args_parser()
    for flag in METHOD_FLAGS:
        if flag not in METHODS[args.method].flags and getattr(args, flag) != defaults.get_default(flag):
            users = ', '.join(sorted(name for name, m in METHODS.items() if flag in m.flags))
            fail(f'--{flag}: {args.method} does not use it (it is for {users})')


def validate_args(args):
    """Every flag checked before any work starts: a bad one ends the run in one line naming it."""
    method = METHODS[args.method]
    for flag in ('img_size', 'patch_size', 'batch_size', 'accum_iter', 'log_every', 'vis_every', 'decoder_dim',
                 'decoder_heads'):
        if getattr(args, flag) < 1:
            fail(f'--{flag} {getattr(args, flag)} must be at least 1')
    for flag in ('warmup_epochs', 'num_workers', 'decoder_depth', 'skip_nonfinite', 'weight_decay', 'mimic_weight',
                 'fusion_layers'):
        if getattr(args, flag) < 0:
            fail(f'--{flag} {getattr(args, flag)} must not be negative')
    if args.img_size % args.patch_size:
        fail(f'--img_size {args.img_size} is not divisible by --patch_size {args.patch_size}')
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        fail(f'--decoder_dim {args.decoder_dim} must be divisible by --decoder_heads {args.decoder_heads} and by 4 '
             f'(its sin-cos position code)')
    if not 0 < args.mask_ratio < 1:
        fail(f'--mask_ratio {args.mask_ratio} must lie strictly between 0 and 1')
    if args.decode_on_device and args.gpu_data:
        fail('--decode_on_device and --gpu_data: choose one (--gpu_data for data sets that fit on the device, '
             '--decode_on_device for image folders that do not)')
    if args.decode_on_device and args.data in ('cifar10', 'cifar100'):
        fail(f'--decode_on_device reads image files, and {args.data} is a tensor data set: use --gpu_data')
    if not 0 <= args.drop_path < 1:
        fail(f'--drop_path {args.drop_path} must lie in [0, 1)')
    for flag in ('blr', 'lr', 'opt_eps'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            fail(f'--{flag} {getattr(args, flag)} must be positive')
    if not all(0 <= beta < 1 for beta in args.betas):
        fail(f'--betas {" ".join(map(str, args.betas))}: each must lie in [0, 1)')
    if args.clip_grad is not None and args.clip_grad <= 0:
        fail(f'--clip_grad {args.clip_grad} must be positive (leave it out for no clipping)')
    check_device(args.device)
    depth = mae.VIT_SIZES[args.model]['depth']
    if args.teacher_depth is not None and not 0 <= args.teacher_depth <= depth:
        fail(f'--teacher_depth {args.teacher_depth}: {args.model} has {depth} blocks to keep (0 to {depth})')
    if args.fusion_layers > depth:
        fail(f'--fusion_layers {args.fusion_layers}: {args.model} has {depth} blocks to mix')
    if args.stages is None:
        args.stages = len(args.stage_epochs) if args.stage_epochs else method.default_stages
    if args.stages < 1:
        fail(f'--stages {args.stages}: a run needs at least one stage')
    if args.stage_epochs:
        if len(args.stage_epochs) != args.stages or min(args.stage_epochs) < 1:
            fail(f'--stage_epochs {args.stage_epochs} must give {args.stages} positive epoch counts')
        if args.epochs is not None and args.epochs != sum(args.stage_epochs):
            fail(f'--epochs {args.epochs} disagrees with --stage_epochs {args.stage_epochs} '
                 f'({sum(args.stage_epochs)} in all): give one of them')
        args.epochs = sum(args.stage_epochs)
    else:
        args.epochs = 200 if args.epochs is None else args.epochs
        if args.epochs < 1:
            fail(f'--epochs {args.epochs} must be at least 1')
        if args.epochs < args.stages:
            fail(f'--epochs {args.epochs} is fewer than --stages {args.stages}')
        # an even split; the last stages take the remainder
        args.stage_epochs = [args.epochs // args.stages + (s >= args.stages - args.epochs % args.stages)
                             for s in range(args.stages)]
    if not all(1 <= epoch <= args.epochs for epoch in args.save_epochs):
        fail(f'--save_epochs {",".join(map(str, args.save_epochs))}: each must be an epoch of this run (1 to '
             f'{args.epochs})')


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f'--device {name}: not a device name (cpu, cuda, cuda:1, ...)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail(f'--device {name}: no CUDA device is visible to this process; use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        fail(f'--device {name}: this script runs on cpu or cuda')


def autocast_for(args, device):
    """--precision bf16: autocast to bfloat16 (no loss scaler needed, unlike fp16, which NaNs in long MAE runs), on
    GPUs and, for tests and CPUs with bf16 matrix units, on CPUs alike; fp32: no autocast."""
    if args.precision is None:
        args.precision = 'bf16' if device.type == 'cuda' else 'fp32'
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == 'bf16' else nullcontext()


class Run:
    """What one pre-training run holds between its phases: set by set_up, changed by stage switches and epochs."""


def build_loader(run):
    """The training images in the resumable, distributed sampler's order (augmented by the DataLoader's workers, or on
    the device with --gpu_data), and the unaugmented set the figures use."""
    args = run.args
    if not run.is_main:  # rank 0 downloads first, so that ranks do not race on the same files
        barrier()
    run.dataset = build_dataset(args, 'train', pretrain_transform(args.img_size),
                                ImageFileBytes if args.decode_on_device else ImageFolderSkippingBroken)
    run.vis_dataset = build_dataset(args, 'train', eval_transform(args.img_size))
    if run.is_main:
        barrier()
    run.sampler = ResumableSampler(run.dataset, num_replicas=run.world_size, rank=run.rank, shuffle=True,
                                   seed=args.seed)
    if args.gpu_data:
        run.dataset.transform = transforms.PILToTensor()  # decoded once, augmented on the device
        run.loader = DeviceImages(run.dataset, run.sampler, args.batch_size, args.img_size, run.device,
                                  args.num_workers)
    else:  # workers started once, kept across epochs; uint8 batches, pinned on GPUs, normalised on the device
        loader = DataLoader(run.dataset, batch_size=args.batch_size, sampler=ImageSeeds(run.sampler, args.seed),
                            num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                            pin_memory=run.device.type == 'cuda', drop_last=True, worker_init_fn=ignore_stop_signals,
                            collate_fn=as_lists if args.decode_on_device else None)
        run.loader = (DecodedOnDevice(loader, run.dataset, args.img_size, run.device) if args.decode_on_device
                      else NormalizedOnDevice(loader, run.device))
    run.steps_per_epoch = len(run.loader) // args.accum_iter
    if run.steps_per_epoch == 0:
        fail(f'{len(run.dataset)} images are too few for {run.world_size} process(es) x --batch_size '
             f'{args.batch_size} x --accum_iter {args.accum_iter}')


def build_model(run):
    """The teacher (a checkpoint's when resuming), the model fitted to it, and a fresh optimizer."""
    args, ckpt = run.args, run.ckpt
    method = METHODS[args.method]
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    try:  # impossible configurations surface as ValueError from the method: one line, no traceback
        teacher = method.build_teacher(args, ckpt['teacher'] if ckpt else None)
        run.raw_model = method.from_args(args, teacher).to(run.device)
    except ValueError as e:
        fail(e)
    run.teacher = teacher.to(run.device) if teacher is not None else None
    run.eff_batch = args.batch_size * args.accum_iter * run.world_size
    run.peak_lr = args.lr or args.blr * run.eff_batch / 256
    run.optimizer = build_optimizer(run.raw_model, args, run.peak_lr)


def restore_checkpoint(run):
    """Model, optimizer, epoch and stage of the checkpoint being resumed, and a log that says what it covers."""
    args, ckpt, resume = run.args, run.ckpt, run.resume
    load_state(run.raw_model, ckpt['model'], f'{resume} ({ckpt["args"]["method"]} {ckpt["args"]["model"]})')
    load_state(run.optimizer, ckpt['optimizer'], f'the optimizer state in {resume}')
    run.start_epoch, run.stage = ckpt['epoch'], ckpt['stage']
    if run.is_main:
        print(f'resumed from {resume} at epoch {run.start_epoch}, step {ckpt["step"]} (stage {run.stage})')
        restore_log(run.out / 'log.jsonl', lambda row: row['epoch'] < run.start_epoch, ckpt.get('log_row'))
        restore_log(run.out / 'steps.jsonl', lambda row: (row['epoch'], row['end_step']) <= (ckpt['epoch'],
                                                                                              ckpt['step']))
        if ckpt['args']['stage_epochs'] != args.stage_epochs:
            print(f'note: {resume} was trained on a schedule of {ckpt["args"]["stage_epochs"]} epochs per stage; '
                  f'this run\'s is {args.stage_epochs}: the lr schedule continues re-stretched to it')


def announce(run):
    args = run.args
    if args.teacher not in (None, 'random'):  # which file teaches, and which loss term belongs to which file
        print(f'teacher: {args.teacher}' + ''.join(f'; loss_mimic_{name} <- {source["weights"]}'
                                                   for name, source in getattr(run.teacher, 'sources', {}).items()))
    n_params = sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad)
    print(f'{args.method} {args.model}: {n_params / 1e6:.1f}M trainable parameters; {len(run.dataset)} images; '
          f'{run.world_size} process(es) on {run.device}; effective batch {run.eff_batch}; peak lr {run.peak_lr:.3g}')


def set_up(args):
    """Set-up and resume: processes, data, teacher and model, optimizer, and the position a checkpoint holds.
    -> the Run, or None when the checkpoint has already trained every epoch."""
    run = Run()
    run.args = args
    run.rank, run.world_size, run.device = init_distributed(args.device)
    run.is_main, run.out = run.rank == 0, Path(args.output_dir)
    run.autocast = autocast_for(args, run.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    build_loader(run)

    run.resume = Path(args.resume) if args.resume else run.out / 'checkpoint-last.pth'
    required = ('model', 'optimizer', 'epoch', 'step', 'stage', 'teacher', 'args')
    run.ckpt = load_checkpoint(run.resume, required) if args.resume or run.resume.exists() else None
    if run.ckpt:
        refuse_another_run(run.ckpt.get('identity') or run_identity(run.ckpt['args'], PRETRAIN_IDENTITY),
                           run_identity(args, PRETRAIN_IDENTITY), run.resume)
    build_model(run)
    run.start_epoch, run.stage = 0, 0
    if run.ckpt:
        restore_checkpoint(run)
        # the weights live in the model and optimizer now: keep the position, not a second copy for the whole run
        run.ckpt = {key: value for key, value in run.ckpt.items() if key not in ('model', 'optimizer', 'teacher')}
    if run.start_epoch >= args.epochs:
        if run.is_main:
            print(f'nothing to do: {run.resume} has already trained {run.start_epoch} of {args.epochs} epochs')
        return None

    # Training FLOPs per image, for MFU against the card's measured peak; counted again when a stage changes the teacher.
    run.peak_flops = measured_peak_flops(run.device) if run.device.type == 'cuda' else None
    run.flops = flops_per_image(run.raw_model, run.teacher, args, run.device)
    run.model = torch.compile(run.raw_model) if args.compile else run.raw_model
    if run.world_size > 1:
        run.model = DDP(run.model, device_ids=[run.device.index] if run.device.type == 'cuda' else None)

    # A fixed batch and fixed masks, so that the PNGs of successive epochs are comparable.
    vis_ids = torch.linspace(0, len(run.vis_dataset) - 1, 8).long().tolist()
    run.vis_imgs = torch.stack([run.vis_dataset[i][0] for i in vis_ids]).to(run.device)
    run.vis_noise = torch.rand(len(vis_ids), run.raw_model.num_patches, generator=torch.Generator().manual_seed(0))
    if run.is_main:
        announce(run)
    run.stage_starts = [sum(args.stage_epochs[:s]) for s in range(args.stages)]
    run.warmup_steps = [warmup_steps(args.warmup_epochs, epochs, run.steps_per_epoch, run.is_main)
                        for epochs in args.stage_epochs]  # each stage warms up afresh
    run.last_row = run.ckpt.get('log_row') if run.ckpt else None  # the log's last row, kept in every checkpoint
    return run


def switch_stage(run):
    """A stage boundary (dBOT §3): the student becomes the frozen teacher and starts again from a fresh
    initialisation, identical on every rank."""
    run.stage += 1
    run.teacher = run.raw_model.next_stage(run.teacher)
    broadcast_parameters(run.raw_model)
    # A fresh AdamW for the fresh student: the moments of the previous stage's converged network say nothing about
    # the new one's gradients (the official code keeps them; warmup makes the difference small).
    run.optimizer = build_optimizer(run.raw_model, run.args, run.peak_lr)
    run.flops = flops_per_image(run.raw_model, run.teacher, run.args, run.device)  # --teacher_depth 0: a whole ViT now
    if run.is_main:
        path = run.out / f'teacher-stage{run.stage}.pth'
        save_checkpoint(dict(model=run.raw_model.teacher_state(run.teacher), args=vars(run.args), stage=run.stage), path)
        print(f'stage {run.stage}: the student of stage {run.stage - 1} is the frozen teacher now ({path}); the '
              f'student starts again from a fresh initialisation')


def accumulate_gradients(run, batches):
    """One optimizer step's gradients over --accum_iter micro-batches (the mean of their losses', as the official
    engine_pretrain.py divides each by accum_iter) -> the sum of the micro-batches' losses and of each loss term,
    detached, on the device: every micro-batch is logged and checked for NaN, not only the last. DDP all-reduces the
    gradients only on the last micro-batch."""
    args = run.args
    loss_sum, term_sums = 0, {}
    for micro in range(args.accum_iter):
        imgs = next(batches)[0].to(run.device, non_blocking=True)
        last_micro = micro == args.accum_iter - 1
        with nullcontext() if run.world_size == 1 or last_micro else run.model.no_sync():
            loss = forward_backward(run.model, run.teacher, imgs, args.mask_ratio, run.autocast, 1 / args.accum_iter)
        loss_sum = loss_sum + loss.detach()
        for name, value in run.raw_model.loss_terms.items():  # e.g. MR-MAE's reconstruction and mimic terms
            term_sums[name] = term_sums.get(name, 0) + value
    return loss_sum, term_sums


def save_position(run, epoch, steps_done, loss_sum, term_sums):
    """A signal stops the run mid-epoch: every rank's exact position goes into the checkpoint (rank 0 writes it)."""
    positions = rank_positions(run.device, loss_sum=loss_sum, term_sums=term_sums)
    if run.is_main:
        save_checkpoint(dict(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(), epoch=epoch,
                             step=steps_done, ranks=positions, stage=run.stage,
                             teacher=run.raw_model.teacher_state(run.teacher), args=vars(run.args),
                             identity=run_identity(run.args, PRETRAIN_IDENTITY), log_row=run.last_row),
                        run.out / 'checkpoint-last.pth')
        print(f'\nstopped by a signal in epoch {epoch} after step {steps_done} of {run.steps_per_epoch}; the same '
              f'command continues from {run.out / "checkpoint-last.pth"}')
    barrier()


class LossWindows:
    """steps.jsonl: the training loss and its terms averaged over the steps between log points (--log_every), over
    every rank, so that a short run has a curve and a long one shows what an epoch's mean hides. Each row names the
    steps [first_step, end_step) of its epoch that it averages: a signal's stop ends a window early, and the resumed
    run starts the next one there."""

    def __init__(self, run, epoch, first_step, loss_sum, term_sums):
        self.run, self.epoch = run, epoch
        self.start(first_step, loss_sum, term_sums, skipped_steps=0)

    def start(self, step, loss_sum, term_sums, skipped_steps):
        self.first_step, self.skipped_steps = step, skipped_steps
        self.loss_sum, self.term_sums = loss_sum.clone(), dict(term_sums)  # loss_sum grows in place

    def close(self, end_step, loss_sum, term_sums, skipped_steps):
        """Write the window that ends before end_step (rank 0 writes; every rank calls) and start the next there."""
        run = self.run
        micro_batches = (end_step - self.first_step - (skipped_steps - self.skipped_steps)) * run.args.accum_iter
        if micro_batches > 0:
            sums = dict(loss=loss_sum - self.loss_sum,
                        **{name: total - self.term_sums.get(name, 0) for name, total in term_sums.items()})
            means = means_over_ranks(sums, micro_batches)
            if run.is_main:
                with open(run.out / 'steps.jsonl', 'a') as f:
                    f.write(json.dumps(dict(epoch=self.epoch, stage=run.stage, first_step=self.first_step,
                                            end_step=end_step, steps_per_epoch=run.steps_per_epoch, **means)) + '\n')
        self.start(end_step, loss_sum, term_sums, skipped_steps)


def train_one_epoch(run, epoch):
    """The optimizer steps of one epoch (the official MAE's name), from the step a signal stopped it at if it did.
    -> the epoch's log row, or None when a signal stops the run (its exact position is then in the checkpoint)."""
    args, ckpt, device = run.args, run.ckpt, run.device
    stage_steps = args.stage_epochs[run.stage] * run.steps_per_epoch
    step_in_stage = (epoch - run.stage_starts[run.stage]) * run.steps_per_epoch
    loss_sum, term_sums = torch.zeros((), device=device), {}
    resuming_mid_epoch = ckpt and ckpt['step'] and epoch == run.start_epoch  # an epoch a signal interrupted
    first_step = ckpt['step'] if resuming_mid_epoch else 0
    if resuming_mid_epoch:
        position = rank_position(ckpt, run.rank, run.world_size, run.resume)
        loss_sum = position['loss_sum'].to(device)
        term_sums = {name: value.to(device) for name, value in position['term_sums'].items()}
    run.sampler.set_epoch(epoch)
    run.sampler.start = first_step * args.batch_size * args.accum_iter
    if isinstance(run.dataset, ImageFolderSkippingBroken) and not args.gpu_data:  # --gpu_data decoded them once:
        run.dataset.skipped.zero_()                                               # the same ones stand in each epoch
    run.model.train()
    nonfinite_step, skipped_steps = torch.full((), -1, device=device), 0
    last_log_step, last_log_time, epoch_start = first_step, time.perf_counter(), time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its workers' base seed on its first iter() only
        batches = iter(run.loader)
    if resuming_mid_epoch:
        restore_rng_states(position['rng_state'], device)
    stop_vote = StopVote(first_step, run.world_size)
    windows = LossWindows(run, epoch, first_step, loss_sum, term_sums)
    bar = tqdm(total=run.steps_per_epoch, initial=first_step, desc=f'epoch {epoch}', disable=not run.is_main,
               dynamic_ncols=True)
    for step in range(first_step, run.steps_per_epoch):
        lr = lr_at(step_in_stage + step, stage_steps, run.warmup_steps[run.stage], run.peak_lr)
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        loss, terms = accumulate_gradients(run, batches)  # sums over the step's micro-batches
        if args.skip_nonfinite and max_over_ranks(~torch.isfinite(loss)):  # opt-in: one host sync per step
            skipped_steps += 1
            if skipped_steps > args.skip_nonfinite:
                fail(f'{skipped_steps} non-finite losses in epoch {epoch}, more than --skip_nonfinite '
                     f'{args.skip_nonfinite}; the last good checkpoint is {run.out / "checkpoint-last.pth"}')
            run.optimizer.zero_grad(set_to_none=True)
            continue
        nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss), step, nonfinite_step)
        loss_sum += loss
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0) + value
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        bar.update()
        if (step + 1) % args.log_every == 0 or step + 1 == run.steps_per_epoch:  # the only host syncs in the loop
            check_finite(nonfinite_step, epoch, run.out)
            now = time.perf_counter()
            img_per_s = (step + 1 - last_log_step) * run.eff_batch / (now - last_log_time)
            mean_loss = loss_sum.item() / ((step + 1 - skipped_steps) * args.accum_iter)
            postfix = dict(loss=f'{mean_loss:.4f}', lr=f'{lr:.2e}', img_s=f'{img_per_s:.0f}')
            if run.peak_flops:
                postfix['mfu'] = f'{img_per_s / run.world_size * run.flops / run.peak_flops:.1%}'
            bar.set_postfix(postfix)  # shown at the last step too, so that short epochs show it
            last_log_step, last_log_time = step + 1, now
            windows.close(step + 1, loss_sum, term_sums, skipped_steps)
        if stop_vote.stops_after(step, run.steps_per_epoch):
            check_finite(nonfinite_step, epoch, run.out)
            windows.close(step + 1, loss_sum, term_sums, skipped_steps)
            save_position(run, epoch, step + 1, loss_sum, term_sums)
            return None
    bar.close()
    check_finite(nonfinite_step, epoch, run.out)
    seconds = time.perf_counter() - epoch_start
    return epoch_row(run, epoch, lr, loss_sum, term_sums, skipped_steps, (run.steps_per_epoch - first_step) / seconds)


def epoch_row(run, epoch, lr, loss_sum, term_sums, skipped_steps, steps_per_second):
    """The epoch's log row: losses averaged over every rank's micro-batches, speed, counted FLOPs, skipped work."""
    micro_batches = (run.steps_per_epoch - skipped_steps) * run.args.accum_iter
    img_per_s = steps_per_second * run.eff_batch
    term_means = means_over_ranks(dict(loss=loss_sum, **term_sums), micro_batches)
    row = dict(epoch=epoch, stage=run.stage, loss=term_means.pop('loss'), lr=lr,
               img_per_s=round(img_per_s, 1), gflops_per_img=round(run.flops / 1e9, 6), **term_means)
    if run.peak_flops:
        row['mfu'] = round(img_per_s / run.world_size * run.flops / run.peak_flops, 4)
    row.update(skipped_steps=skipped_steps, skipped_images=int(run.dataset.skipped.sum())
               if isinstance(run.dataset, ImageFolderSkippingBroken) else 0)
    return row


def end_epoch(run, epoch, row):
    """The end of an epoch on rank 0: the figure, the checkpoint, then the log row it covers."""
    args, raw_model = run.args, run.raw_model
    if run.is_main:
        if (epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs:
            raw_model.eval()
            with torch.no_grad(), run.autocast:
                targets = run.teacher(run.vis_imgs) if run.teacher is not None else None
                _, pred, mask = raw_model(run.vis_imgs, args.mask_ratio, run.vis_noise.to(run.device), targets)
                rows, caption = raw_model.visualize(run.vis_imgs, pred, mask, targets)
            save_figure(rows, caption, run.out / f'vis-epoch{epoch:04d}.png')
        # The checkpoint first, holding its row: the log never shows an epoch that no checkpoint covers.
        state = dict(model=raw_model.state_dict(), optimizer=run.optimizer.state_dict(), epoch=epoch + 1, step=0,
                     stage=run.stage, teacher=raw_model.teacher_state(run.teacher), args=vars(args),
                     identity=run_identity(args, PRETRAIN_IDENTITY), log_row=row)
        if epoch + 1 in args.save_epochs:  # kept before checkpoint-last: a kill between the two redoes this epoch
            save_checkpoint(state, run.out / f'checkpoint-epoch{epoch + 1}.pth')
        save_checkpoint(state, run.out / 'checkpoint-last.pth')
        with open(run.out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        tqdm.write(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
    run.last_row = row
    barrier()


def pretrain(args):
    """The run, its flags already checked and its output folder held (main): set-up and resume, then for every
    epoch the stage switch, train_one_epoch and end_epoch."""
    run = set_up(args)
    if run is None:
        return
    for epoch in range(run.start_epoch, args.epochs):
        # Every (epoch, rank) has its own RNG streams derived from --seed, so a resumed run draws the same masks,
        # augmentations and re-initialisations as an uninterrupted one without storing RNG state (data loader
        # workers are seeded from them). Only a run stopped mid-epoch stores its state, to continue from there.
        seed_everything(args.seed, epoch, run.rank)
        if epoch in run.stage_starts[run.stage + 1:]:
            switch_stage(run)
        row = train_one_epoch(run, epoch)
        if row is None:  # stopped by a signal
            return
        end_epoch(run, epoch, row)


def main(args):
    refuse_unused_flags(args)
    validate_args(args)
    with stop_on_signals(), exclusive_output_dir(args.output_dir), unreadable_data_in_one_line():
        pretrain(args)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
