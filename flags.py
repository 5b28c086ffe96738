"""
Flags as declared data, for train.py, finetune.py, bench.py and reproduce.py: each flag's type and range where it is
declared (so NaN, inf, overflow, empty and out-of-range values are refused by one rule, in one line naming the flag),
and each flag's class on resume (so a rerun with changed flags is refused, announced or accepted by one table).
test_bad_input.py walks every parser and every flag: a flag added later is covered without a case of its own.
"""

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime import fail


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusal of a flag is one line naming it and why, as every other refusal here, instead of the
    whole usage block."""

    def error(self, message):
        raise SystemExit(f'error: {" ".join(message.split())} (--help lists the flags)')


class Range:
    """A number flag's type and range, as argparse's `type`: the value must parse as `kind`, be finite, and lie in
    [low, high] (or, with open_low/open_high, exclude that end)."""

    def __init__(self, kind, low=None, high=None, open_low=False, open_high=False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if self.kind is int else "a number"}')
        below = self.low is not None and (value < self.low or self.open_low and value == self.low)
        above = self.high is not None and (value > self.high or self.open_high and value == self.high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f'{text} is outside {self.describe()}')
        return value

    def describe(self):
        left = '(-inf' if self.low is None else f'({self.low}' if self.open_low else f'[{self.low}'
        right = 'inf)' if self.high is None else f'{self.high})' if self.open_high else f'{self.high}]'
        return f'{left}, {right}'


class Ranges:
    """A comma-separated list of values, each in the Range `item` (e.g. --stage_epochs 800,800)."""

    def __init__(self, item):
        self.item = item

    def __call__(self, text):
        return [self.item(part) for part in text.split(',')]


def text(value):
    """A flag that takes a name, a path or a policy: an empty value names nothing (a shell variable that was not set)
    and is refused at the flag, instead of meaning the current folder or 'off' somewhere later. A leading ~ is the
    home folder, as the shell would have made it had the value not followed an '=' (--output_dir=~/runs)."""
    if not value.strip():
        raise argparse.ArgumentTypeError('an empty value names nothing: give one, or leave the flag out')
    return os.path.expanduser(value) if value.startswith('~') else value


# Ranges many flags share
COUNT = Range(int, 1, 2 ** 31 - 1)  # sizes, steps, epochs: at least one
AMOUNT = Range(int, 0, 2 ** 31 - 1)  # may be zero
FRACTION = Range(float, 0, 1, open_high=True)  # [0, 1): drop path, probabilities
RATE = Range(float, 0, 1e3, open_low=True)  # a positive learning rate or scale
NONNEGATIVE = Range(float, 0, 1e6)  # weights and decays
SEED = Range(int, 0, 2 ** 63 - 1)  # what torch.manual_seed takes
# Sizes a real model has (ViT-H: 32 blocks, width 1280; images up to 1024 px at patch 2): beyond them a value only
# exhausts the memory
PIXELS = Range(int, 1, 8192)  # image sizes and patch sizes
WIDTH = Range(int, 1, 16384)  # embedding widths
DEPTH = Range(int, 0, 256)  # blocks
HEADS = Range(int, 1, 1024)


def default_workers():
    """Loader workers per process: the cores this process may run on (its affinity: a scheduler's share of the node,
    not every core the node has) shared among the processes torchrun starts on it (srun's tasks each have their
    own: SLURM_CPUS_PER_TASK), at most 8 (beyond that the model, not decoding, is usually the limit), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    share = os.environ.get('SLURM_CPUS_PER_TASK', '')
    if os.environ.get('SLURM_STEP_NUM_TASKS') and share.isdigit():  # a task of srun: its cores are its own already
        return max(1, min(8, cores, int(share)))
    # torchrun's, or srun's --ntasks-per-node ('4', or '4(x2)'); a leftover may say anything
    processes = os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0]
    processes = max(1, int(processes)) if processes.isdigit() else 1
    return max(1, min(8, cores // processes))


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f'--device {name}: not a device name (cpu, cuda, cuda:1, ...)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail(f'--device {name}: no CUDA device is visible to this process; use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        fail(f'--device {name}: this script runs on cpu or cuda')


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's
GRAPHED_MODES = ('reduce-overhead', 'max-autotune')  # the modes that replay the step as CUDA graphs


def check_compile(args):
    """--compile MODE against the device and the step. CUDA graphs replay a recorded step with one launch, and need a
    GPU; they reuse their outputs' memory, gradients included, which breaks gradients summed over micro-batches
    (pytorch/pytorch#169545; #96693 reports a silently wrong sum); under DDP's gradient hooks they are not verified
    here."""
    if args.compile not in GRAPHED_MODES:
        return
    if torch.device(args.device).type != 'cuda':
        fail(f'--compile {args.compile} replays the step as CUDA graphs, which need a GPU: on {args.device}, use '
             f'--compile')
    if args.accum_iter > 1:
        fail(f'--compile {args.compile} with --accum_iter {args.accum_iter}: CUDA graphs overwrite the gradients that '
             f'accumulate over micro-batches (pytorch/pytorch#169545); use --compile, or a larger --batch_size')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        fail(f'--compile {args.compile}: CUDA graphs under DDP are not verified here; use --compile with torchrun')


def check_data_dir(args, parser):
    """--data_dir is where CIFAR is downloaded to: with a folder as --data it would change nothing."""
    if args.data not in ('cifar10', 'cifar100') and args.data_dir != parser.get_default('data_dir'):
        fail(f'--data_dir {args.data_dir}: it is where cifar10/cifar100 are downloaded to, and --data {args.data} is a '
             f'folder; leave --data_dir out')


def check_pipelines(args):
    """train.py's three input pipelines: one at a time, each on the data it reads."""
    if args.decode_on_device and args.gpu_data:
        fail('--decode_on_device and --gpu_data: choose one (--gpu_data for data sets that fit on the device, '
             '--decode_on_device for image folders that do not)')
    if args.decode_on_device and args.data in ('cifar10', 'cifar100'):
        fail(f'--decode_on_device reads image files, and {args.data} is a tensor data set: use --gpu_data')


# -----------------------------------------------------------------------------------------------------------------
# What a rerun may change

@dataclass(frozen=True)
class OnResume:
    """Every flag of a script in one of four classes, for a run that continues a checkpoint with changed flags:
    - free: changes nothing the run computes (where files go, how fast, how often it reports): accepted silently;
    - schedule: changes the rest of the run (lr, epochs, regularisation, seed): announced, then followed;
    - position: schedule flags that also fix where an epoch stands (which images a step takes): announced between
      epochs, refused in the middle of one;
    - identity, every other flag, one added later included: makes the run what it is (method, architecture, data,
      loss): refused, as resuming would mix two runs in one model and one log."""
    free: tuple
    schedule: tuple
    position: tuple
    meant: object = None  # identity dict -> the same, each value as meant (a default written out, a file's content)

    def identity(self, args):
        """The identity flags' values (args: a Namespace, or a checkpoint's dict of them); a data folder by its
        absolute path."""
        named = set(self.free + self.schedule + self.position)
        args = args if isinstance(args, dict) else vars(args)
        identity = {key: value for key, value in sorted(args.items()) if key not in named}
        if identity.get('data') not in (None, 'cifar10', 'cifar100'):
            identity['data'] = str(Path(identity['data']).resolve())
        return identity

    def as_meant(self, identity):
        return self.meant(identity) if self.meant else identity

    def saved_identity(self, checkpoint):
        """The identity a checkpoint was written with (older ones: from its flags), as meant."""
        return self.as_meant(checkpoint.get('identity') or self.identity(checkpoint['args']))

    def check(self, checkpoint, args, identity, path, announce=True):
        """Refuse, announce or accept each flag that differs from the checkpoint's (identity: this run's, as
        identity() gives it, or amended by the script). Checkpoints written before a flag existed do not name it."""
        saved_args = checkpoint['args']
        saved_identity, identity = self.saved_identity(checkpoint), self.as_meant(identity)
        for key, value in identity.items():
            if key in saved_identity and saved_identity[key] != value:
                name = f'--{key}' if key in saved_args else key.replace('_', ' ')  # data_files: the data's listing
                fail(f'{path} belongs to another run: its {name} is {saved_identity[key]}, this run\'s is {value}. '
                     f'Continue it with its own flags and data, or start afresh with another --output_dir')
        for key in self.schedule + self.position:
            before, now = saved_args.get(key, getattr(args, key)), getattr(args, key)
            if before == now:
                continue
            if key in self.position and checkpoint['step']:
                fail(f'{path} stopped in the middle of epoch {checkpoint["epoch"]} with --{key} {before}: continue '
                     f'it with --{key} {before} (a change would move its place in the epoch); change it after that '
                     f'epoch, or start afresh with another --output_dir')
            if announce:
                print(f'note: {path} was trained with --{key} {before}; this run continues with --{key} {now}')
