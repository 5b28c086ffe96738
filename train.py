"""
The one pre-training loop for every method in this repository.

    python train.py --data cifar10                                   # one process, GPU if there is one, else CPU
    torchrun --nproc_per_node 8 train.py --model vit_base ...         # DDP on one node (NCCL on GPU, gloo on CPU)

The defaults are the papers' optimisation recipe (AdamW betas 0.9/0.95, weight decay 0.05, blr 1.5e-4, norm-pix
loss, warmup then half-cosine) on a small model and data set that trains in well under an hour on one GPU:
ViT-Tiny, patch 4, on 32 px CIFAR-10 with a 128-wide, 4-deep decoder; docs/methods.md gives the ImageNet flags.

Where to read: `pretrain` is the table of contents, `train_one_epoch` the step (as the official engine_pretrain.py);
then the recipe, the set-up, logging and the flag checks. A method plugs in through the small interface described
at METHODS. What no paper asks for is elsewhere: processes and signals in runtime.py, checkpoints and resuming in
checkpoints.py, the flags' declared values and resume classes in flags.py, how images arrive in data.py.
"""

import argparse
import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid
from tqdm import tqdm

import checkpoints
import data
import dbot
import flags
import flops
import mae
import mcmae
import mrmae
import runtime
import teachers

METHODS = {'mae': mae.MAE, 'mrmae': mrmae.MRMAE, 'mcmae': mcmae.MCMAE, 'mrmcmae': mrmae.MRMCMAE,
           'dbot': dbot.DBOT}
# The interface between a method and train.py (MAE, MR-MAE, MCMAE and dBOT all implement it):
#
# teacher = Method.build_teacher(args, state=None)  # frozen nn.Module mapping images to targets, or None (MAE);
#                                      # state: what model.teacher_state(teacher) returned, when resuming
# model = Method.from_args(args, teacher)  # nn.Module holding exactly what the optimizer trains, shaped to fit
#                                      # the teacher; model.num_patches = L, the number of maskable tokens
# loss, pred, mask = model(imgs, mask_ratio, noise=None, targets=None)
#     imgs:    (B, 3, H, W) images, normalised with the ImageNet mean/std
#     targets: teacher(imgs) for the same images (train.py computes it without autograd), or None
#     loss:    scalar to minimise;  pred: (B, L, C) per-token predictions;  mask: (B, L), 1 = hidden
# model.loss_terms                     # dict of detached scalars from the last forward, logged beside the loss
# rows, caption = model.visualize(imgs, pred, mask, targets)
#     rows: list of (B, 3, H, W) images in [0, 1], one figure row each; caption: how to read them
# model.teacher_state(teacher)         # what a checkpoint keeps of the teacher (dBOT: weights; MR-MAE: file hashes)
# Method.encoder_class                 # the encoder alone (ViT, or MCMAE's ConvViT): what finetune.py builds
# Method.flags                         # which of train.py's teacher/stage flags the method uses
# Method.default_stages                # 1, except dBOT, which also implements
# teacher = model.next_stage(teacher)  # at a stage boundary: the new teacher; the student re-initialises itself


def get_args_parser():
    parser = flags.ArgumentParser('Masked image pre-training')
    group = parser.add_argument_group('method')
    group.add_argument('--method', default='mae', choices=sorted(METHODS))
    group = parser.add_argument_group('data')
    group.add_argument('--data', type=flags.text, default='cifar10',
                       help='cifar10, cifar100, or a folder: an ImageFolder root with train/ (and val/), '
                       'or a folder of class sub-folders')
    group.add_argument('--data_dir', type=flags.text, default='./data', help='where cifar10/cifar100 are downloaded to')
    group.add_argument('--num_workers', default=flags.default_workers(), type=flags.AMOUNT,
                       help='loader processes per training process (default: its share of the cores, at most 8)')
    group.add_argument('--gpu_data', action='store_true',
                       help='decode a small data set (CIFAR, Tiny-ImageNet) once, keep it on the device as uint8 and '
                       'augment it there')
    group.add_argument('--decode_on_device', action='store_true',
                       help='an image folder of any size (ImageNet): workers only read file bytes; JPEGs are decoded '
                       'in batches on the device (nvJPEG on GPUs), then cropped, flipped and normalised there')
    group = parser.add_argument_group('model')
    group.add_argument('--model', default='vit_tiny', choices=sorted(mae.VIT_SIZES))
    group.add_argument('--img_size', default=32, type=flags.PIXELS)
    group.add_argument('--patch_size', default=4, type=flags.PIXELS)
    group.add_argument('--decoder_dim', default=128, type=flags.WIDTH, help='paper (ImageNet): 512')
    group.add_argument('--decoder_depth', default=4, type=flags.DEPTH, help='paper (ImageNet): 8')
    group.add_argument('--decoder_heads', default=4, type=flags.HEADS, help='paper (ImageNet): 16')
    group.add_argument('--mask_ratio', default=0.75, type=flags.Range(float, 0, 1, open_low=True, open_high=True))
    group.add_argument('--norm_pix_loss', default=True, action=argparse.BooleanOptionalAction)
    group.add_argument('--drop_path', default=0.0, type=flags.FRACTION,
                       help='in encoder and decoder (dBOT base: 0.2)')
    group = parser.add_argument_group('teachers (MR-MAE, dBOT) and stages (dBOT)')
    group.add_argument('--teacher', type=flags.text, default=None,
                       help='mrmae: clip+dino (default), clip, dino, or ViT files trained here, joined by "+"; '
                       'dbot: random (default: a frozen copy of the student\'s initialisation) or a ViT '
                       'checkpoint file (ours, timm, official MAE or DINO layout) as the first teacher')
    group.add_argument('--clip_model', type=flags.text, default='ViT-B-16',
                       help='open_clip model name of the CLIP teacher')
    group.add_argument('--clip_weights', type=flags.text, default=None,
                       help='its weights: a local open_clip file, or a tag')
    group.add_argument('--clip_quick_gelu', default=True, action=argparse.BooleanOptionalAction,
                       help="OpenAI's CLIP weights (the paper's) need QuickGELU; turn off for LAION/DataComp ones")
    group.add_argument('--dino_model', type=flags.text, default='vit_base_patch16_224.dino',
                       help='timm model name of the DINO teacher')
    group.add_argument('--dino_weights', type=flags.text, default=None, help='its weights: a local timm file, or "hub"')
    group.add_argument('--mimic_weight', default=1.0, type=flags.NONNEGATIVE, help='mrmae: weight of the mimic loss')
    group.add_argument('--focused_mimic', action='store_true',
                       help='mrmae: pick the visible tokens by the teacher\'s [CLS] attention (our reading)')
    group.add_argument('--fusion_layers', default=0, type=flags.DEPTH,
                       help='mrmae: mimic from a learned mix of the last K encoder layers (our reading)')
    group.add_argument('--teacher_depth', default=None, type=flags.DEPTH,
                       help='dbot random teacher: keep only its first N blocks (0: the large/huge recipe)')
    group.add_argument('--stages', default=None, type=flags.COUNT,
                       help='dbot: bootstrapping stages sharing --epochs evenly (default 2; 1 for other methods)')
    group.add_argument('--stage_epochs', default=None, type=flags.Ranges(flags.COUNT),
                       help='epochs of each stage, e.g. 800,800 (overrides --epochs)')
    group = parser.add_argument_group('optimisation')
    group.add_argument('--epochs', default=None, type=flags.COUNT, help='in all stages together (default 200)')
    group.add_argument('--warmup_epochs', default=10, type=flags.AMOUNT, help='at the start of every stage')
    group.add_argument('--batch_size', default=256, type=flags.COUNT, help='per process')
    group.add_argument('--accum_iter', default=1, type=flags.COUNT, help='micro-batches per optimizer step')
    group.add_argument('--blr', default=1.5e-4, type=flags.RATE, help='lr = blr * effective batch / 256')
    group.add_argument('--lr', default=None, type=flags.RATE, help='absolute lr; overrides --blr')
    group.add_argument('--min_lr', default=0.0, type=flags.NONNEGATIVE,
                       help='the lr the half-cosine ends at (MAE: 0; dBOT with a CLIP teacher: 1e-5)')
    group.add_argument('--weight_decay', default=0.05, type=flags.NONNEGATIVE)
    group.add_argument('--betas', default=[0.9, 0.95], type=flags.FRACTION, nargs=2,
                       help="AdamW's betas (MAE: 0.9 0.95)")
    group.add_argument('--opt_eps', default=1e-8, type=flags.Range(float, 0, 1, open_low=True), help="AdamW's eps")
    group.add_argument('--clip_grad', default=None, type=flags.Range(float, 0, 1e6, open_low=True),
                       help='max gradient norm (none by default)')
    group.add_argument('--skip_nonfinite', default=0, type=flags.AMOUNT,
                       help='skip up to N steps per epoch whose loss is NaN/inf (costs a host sync per step)')
    group.add_argument('--seed', default=0, type=flags.SEED)
    group = parser.add_argument_group('system and output')
    group.add_argument('--device', type=flags.text, default='cuda' if torch.cuda.is_available() else 'cpu')
    group.add_argument('--precision', default=None, choices=['bf16', 'fp32'],
                       help='bf16 autocast or plain fp32 (default: bf16 on CUDA, fp32 on CPU)')
    group.add_argument('--compile', nargs='?', const='default', default=None, choices=flags.COMPILE_MODES,
                       help='torch.compile the model; reduce-overhead: as CUDA graphs (GPUs: small models whose steps '
                       'are launch-bound)')
    group.add_argument('--output_dir', type=flags.text, default='./output')
    group.add_argument('--resume', type=flags.text, default=None, help='checkpoint to resume from '
                       '(default: OUTPUT_DIR/checkpoint-last.pth when it exists)')
    group.add_argument('--log_every', default=50, type=flags.COUNT,
                       help='steps between progress updates (host syncs)')
    group.add_argument('--vis_every', default=10, type=flags.COUNT, help='epochs between reconstruction PNGs')
    group.add_argument('--tensorboard', action='store_true',
                       help='also write the logs\' numbers as TensorBoard scalars in OUTPUT_DIR/tensorboard (needs the '
                       'tensorboard package, not a requirement)')
    group.add_argument('--save_every', default=1, type=flags.COUNT,
                       help='epochs between writes of checkpoint-last.pth (the last epoch and a signal always save; a '
                       'kill loses at most this many epochs)')
    group.add_argument('--save_epochs', default=[], type=flags.Ranges(flags.COUNT),
                       help='also keep the checkpoint after these epochs, e.g. 2,4,8 (checkpoint-epochN.pth), for '
                       'evaluating the encoder along the schedule')
    return parser


# The first teacher when --teacher is left out, written out so that a run and its resumption compare as meant
DEFAULT_TEACHER = {'mrmae': 'clip+dino', 'mrmcmae': 'clip+dino', 'dbot': 'random'}


def teacher_as_meant(identity):
    """An identity's --teacher with each file named by its content (sha256:...), so that the same file reached by
    another path, or a copy, is the same teacher; the default written out (checkpoints older than DEFAULT_TEACHER
    stored None)."""
    teacher = identity.get('teacher') or DEFAULT_TEACHER.get(identity.get('method'))
    if teacher:
        teacher = '+'.join(f'sha256:{teachers.sha256(part)}' if Path(part).is_file() else part
                           for part in teacher.split('+'))
    return dict(identity, teacher=teacher)


# What each flag may change when a run resumes (flags.OnResume): a flag named nowhere here is the run's identity.
ON_RESUME = flags.OnResume(
    free=('data_dir', 'num_workers', 'device', 'compile', 'output_dir', 'resume', 'log_every', 'vis_every',
          'tensorboard', 'save_every', 'save_epochs'),
    schedule=('epochs', 'stage_epochs', 'warmup_epochs', 'blr', 'lr', 'min_lr', 'weight_decay', 'betas', 'opt_eps',
              'clip_grad', 'skip_nonfinite', 'drop_path', 'precision'),
    position=('batch_size', 'accum_iter', 'seed', 'gpu_data', 'decode_on_device'), meant=teacher_as_meant)


# -----------------------------------------------------------------------------------------------------------------
# The loop: every epoch, its steps, and what ends it

def pretrain(args):
    """The run, its flags already checked and its output folder held (main): set-up and resume, then for every
    epoch the stage switch, train_one_epoch and end_epoch."""
    run = set_up(args)
    if run is None:
        return
    with runtime.deferring_signals(), run.board:  # a signal now stops the run after a step, with its position saved
        for epoch in range(run.start_epoch, args.epochs):
            # Every (epoch, rank) has its own RNG streams derived from --seed, so a resumed run draws the same masks,
            # augmentations and re-initialisations as an uninterrupted one without storing RNG state (data loader
            # workers are seeded from them). Only a run stopped mid-epoch stores its state, to continue from there.
            runtime.seed_everything(args.seed, epoch, run.rank)
            if epoch in run.stage_starts[run.stage + 1:]:
                switch_stage(run)
            row = train_one_epoch(run, epoch)
            if row is None:  # stopped by a signal
                return
            end_epoch(run, epoch, row)


def train_one_epoch(run, epoch):
    """The optimizer steps of one epoch (the official MAE's name), from the step a signal stopped it at if it did.
    -> the epoch's log row, or None when a signal stops the run (its exact position is then in the checkpoint)."""
    args = run.args
    stage_steps = args.stage_epochs[run.stage] * run.steps_per_epoch
    step_in_stage = (epoch - run.stage_starts[run.stage]) * run.steps_per_epoch
    first_step, position = checkpoints.epoch_start(run, epoch)
    batches = begin_epoch(run, epoch, first_step, position)
    tally = EpochTally(run, epoch, first_step, position)
    stop_vote = runtime.StopVote(first_step, run.world_size)
    for step in range(first_step, run.steps_per_epoch):
        lr = lr_at(step_in_stage + step, stage_steps, run.warmup_steps[run.stage], run.peak_lr, args.min_lr)
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        try:
            loss, terms = accumulate_gradients(run, batches)  # sums over the step's micro-batches
        except data.LoaderWorkerDied as e:
            save_before_loader_death(run, tally, epoch, step, e)
            raise
        if args.skip_nonfinite and runtime.max_over_ranks(~torch.isfinite(loss)):  # opt-in: one host sync per step
            tally.skip()
            run.optimizer.zero_grad(set_to_none=True)
            continue
        tally.add(step, loss, terms)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == run.steps_per_epoch:  # the only host syncs in the loop
            tally.log_point(step + 1, lr)
        if stop_vote.stops_after(step, run.steps_per_epoch):
            tally.close_window(step + 1)
            checkpoints.save_mid_epoch(run, run_state(run), epoch, step + 1, loss_sum=tally.loss_sum,
                                       term_sums=tally.term_sums)
            return None
    return tally.epoch_row(lr)


def save_before_loader_death(run, tally, epoch, step, error):
    """A loader worker died before this step drew anything: in one process, the position after the previous step is
    still exact, and is saved as a signal's stop saves it (several processes cannot agree on it now: their last
    checkpoint stands). loader_errors_in_one_line then reports the death."""
    if run.world_size == 1 and error.at_step_start and step > tally.first_step:
        run.optimizer.zero_grad(set_to_none=True)
        tally.close_window(step)
        checkpoints.save_mid_epoch(run, run_state(run), epoch, step, 'as a loader worker died',
                                   loss_sum=tally.loss_sum, term_sums=tally.term_sums)


def begin_epoch(run, epoch, first_step, position):
    """The images at the epoch's order and first step, the model in training mode, and the batches, drawn with the
    RNG streams a stopped run saved (position) or this epoch's own. -> the iterator of batches."""
    run.images.start_epoch(epoch, first_step * run.args.accum_iter, run.args.gpu_data)
    run.model.train()
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its workers' base seed on its first iter() only
        batches = iter(run.images.loader)
    if position:
        runtime.restore_rng_states(position['rng_state'], run.device)
    return batches


def accumulate_gradients(run, batches):
    """One optimizer step's gradients over --accum_iter micro-batches (the mean of their losses', as the official
    engine_pretrain.py divides each by accum_iter) -> the sum of the micro-batches' losses and of each loss term,
    detached, on the device: every micro-batch is logged and checked for NaN, not only the last. DDP all-reduces the
    gradients only on the last micro-batch."""
    args = run.args
    loss_sum, term_sums = 0, {}
    for micro in range(args.accum_iter):
        try:
            imgs = data.next_batch(batches)[0].to(run.device, non_blocking=True)
        except data.LoaderWorkerDied as e:
            e.at_step_start = micro == 0  # the step has drawn no mask yet: the RNG states are the previous step's
            raise
        last_micro = micro == args.accum_iter - 1
        with nullcontext() if run.world_size == 1 or last_micro else run.model.no_sync():
            loss = forward_backward(run.model, run.teacher, imgs, args.mask_ratio, run.autocast, 1 / args.accum_iter)
        loss_sum = loss_sum + loss.detach()
        for name, value in run.raw_model.loss_terms.items():  # e.g. MR-MAE's reconstruction and mimic terms
            term_sums[name] = term_sums.get(name, 0) + value
    return loss_sum, term_sums


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


def end_epoch(run, epoch, row):
    """The end of an epoch: the reconstruction figure when one is due, then the log row and, every --save_every epochs
    and at the last, the checkpoint that covers it (and the epoch's own copy when --save_epochs names it). A signal
    saves at once whatever --save_every says (train_one_epoch)."""
    args = run.args
    if run.is_main and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
        save_reconstructions(run, run.out / f'vis-epoch{epoch:04d}.png')
    kept = [run.out / f'checkpoint-epoch{epoch + 1}.pth'] if epoch + 1 in args.save_epochs else []
    due = (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or bool(kept)
    run.last_row = row
    checkpoints.save_epoch(run, run_state(run) if due else None, epoch, also=kept)
    run.board.epoch(run.last_row, (epoch + 1) * run.steps_per_epoch)  # with its time and memory


def save_reconstructions(run, path):
    """The fixed figure batch under its fixed masks, with the model's predictions, as one PNG."""
    run.raw_model.eval()
    with torch.no_grad(), run.autocast:
        targets = run.teacher(run.vis_imgs) if run.teacher is not None else None
        _, pred, mask = run.raw_model(run.vis_imgs, run.args.mask_ratio, run.vis_noise.to(run.device), targets)
        rows, caption = run.raw_model.visualize(run.vis_imgs, pred, mask, targets)
    save_figure(rows, caption, path)


def run_state(run):
    """What a checkpoint holds besides its position: weights, optimizer, stage and teacher, flags and the log row."""
    return dict(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(), stage=run.stage,
                teacher=run.teacher_kept, args=vars(run.args), identity=run.identity,
                world_size=run.world_size, log_row=run.last_row, begun_from=run.begun_from)


def switch_stage(run):
    """A stage boundary (dBOT §3): the student becomes the frozen teacher and starts again from a fresh
    initialisation, identical on every rank."""
    run.stage += 1
    before = [id(param) for param in run.raw_model.parameters()]
    run.teacher = run.raw_model.next_stage(run.teacher)
    runtime.broadcast_parameters(run.raw_model)
    if [id(param) for param in run.raw_model.parameters()] != before:  # a new prediction head (a wider first teacher)
        run.model = wrapped(run)  # DDP keeps a list of the parameters it reduces: give it the new ones
    # A fresh AdamW for the fresh student: the moments of the previous stage's converged network say nothing about
    # the new one's gradients (the official code keeps them; warmup makes the difference small).
    run.optimizer = build_optimizer(run.raw_model, run.args, run.peak_lr)
    run.flops = flops_per_image(run.raw_model, run.teacher, run.args, run.device)  # --teacher_depth 0: a whole ViT now
    run.teacher_kept = checkpoints.keep_teacher(run, run.raw_model.teacher_state(run.teacher))
    if run.is_main:
        print(f'stage {run.stage}: the student of stage {run.stage - 1} is the frozen teacher now '
              f'({run.out / f"teacher-stage{run.stage}.pth"}); the student starts again from a fresh initialisation')


# -----------------------------------------------------------------------------------------------------------------
# The recipe (MAE §A.1): parameter groups, AdamW, warm-up and half-cosine lr

def param_groups(model, weight_decay):
    """Weight decay on every parameter of two or more dimensions, the cls and mask tokens included; none on biases
    and norms (1-D). This is the official pre-training code's rule (MAE, dBOT and ConvMAE main_pretrain.py: timm's
    add_weight_decay with no skip list); fine-tuning exempts the tokens (finetune.py), as the official code does."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(model, args, lr):
    """AdamW (MAE §A.1: betas 0.9, 0.95). Fused on every device: one kernel per step, and its step count lives on the
    device, so the update never reads a value back to the host."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=tuple(args.betas), eps=args.opt_eps,
                             fused=True)


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


def refuse_rising_lr(args, peak_lr, eff_batch):
    """A --min_lr above the peak would turn the half-cosine's decay into a rise (train.py and finetune.py)."""
    if args.min_lr > peak_lr:
        runtime.fail(f'--min_lr {args.min_lr:g} is above the peak lr {peak_lr:.3g} (--blr {args.blr:g} x effective '
                     f'batch {eff_batch} / 256, or --lr): give a smaller --min_lr')


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Linear warmup, then half-cosine to min_lr, updated every optimizer step (MAE §A.1)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------------------------------------------
# Set-up and resume

@dataclass
class Run(runtime.Run):
    """What one pre-training run holds between its phases: set by set_up, changed by stage switches and epochs."""
    images: data.TrainingImages = None  # where the batches come from
    # the model and its training (build_model; a stage switch brings a new teacher, student and optimizer)
    raw_model: torch.nn.Module = None
    model: torch.nn.Module = None  # raw_model compiled and/or in DDP: what the steps call
    teacher: torch.nn.Module | None = None
    teacher_kept: object = None  # what the checkpoints keep of it (checkpoints.keep_teacher)
    optimizer: torch.optim.Optimizer = None
    eff_batch: int = 0  # images per optimizer step, over every process and micro-batch
    peak_lr: float = 0.0
    # the schedule and the position in it
    stage: int = 0
    stage_starts: list = field(default_factory=list)  # the first epoch of every stage
    warmup_steps: list = field(default_factory=list)  # per stage
    board: 'Board' = None  # --tensorboard's writer (rank 0), or one that writes nothing
    # measured once: training FLOPs per image (again at a stage switch), the card's peak (GPUs)
    flops: float = 0.0
    peak_flops: float | None = None
    # the figures' fixed images and masks
    vis_imgs: torch.Tensor = None
    vis_noise: torch.Tensor = None

    @property
    def steps_per_epoch(self):
        return self.images.steps_per_epoch


def set_up(args):
    """Set-up and resume: processes, data, teacher and model, optimizer, and the position a checkpoint holds.
    -> the Run, or None when the checkpoint has already trained every epoch."""
    rank, world_size, device = runtime.init_distributed(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    run = Run(args, rank, world_size, device, runtime.autocast_for(args, device),
              images=data.build_training_images(args, rank, world_size, device))
    # as meant, stored so: a teacher file by the content it had at the start (it may move before a resume)
    run.identity = ON_RESUME.as_meant(dict(ON_RESUME.identity(args), data_files=data.fingerprint(run.images.dataset)))
    checkpoints.read_resumed(run, ('model', 'optimizer', 'epoch', 'step', 'stage', 'teacher'), ON_RESUME,
                             run.identity)
    build_model(run)
    resumed_teacher = run.ckpt and run.ckpt['teacher']
    if run.ckpt:  # its weights, optimizer, epoch and stage, and logs that say what it covers
        checkpoints.restore_training(run, run.raw_model, run.optimizer)
        run.stage, position = run.ckpt['stage'], (run.ckpt['epoch'], run.ckpt['step'])
        if run.is_main:
            checkpoints.restore_run_log(run, 'steps.jsonl', lambda row: (row['epoch'], row['end_step']) <= position)
    elif run.is_main:  # a fresh start: what a run killed before its first checkpoint logged covers nothing
        for log in ('log.jsonl', 'steps.jsonl'):
            checkpoints.restore_log(run.out / log, lambda row: False)
    if checkpoints.finished_already(run, args.epochs):
        return None
    run.board = Board(run.out if args.tensorboard and run.is_main else None,
                      run.start_epoch * run.steps_per_epoch + (run.ckpt['step'] if run.ckpt else 0) + 1)

    # Training FLOPs per image, for MFU against the card's measured peak (counted again when a stage ends)
    run.peak_flops = flops.measured_peak_flops(run.device) if run.device.type == 'cuda' else None
    run.flops = flops_per_image(run.raw_model, run.teacher, args, run.device)
    run.model = wrapped(run)
    run.teacher_kept = checkpoints.keep_teacher(run, run.raw_model.teacher_state(run.teacher), resumed_teacher)

    # A fixed batch and fixed masks, so that the PNGs of successive epochs are comparable.
    vis_ids = torch.linspace(0, len(run.images.vis_dataset) - 1, 8).long().tolist()
    run.vis_imgs = torch.stack([run.images.vis_dataset[i][0] for i in vis_ids]).to(run.device)
    run.vis_noise = torch.rand(len(vis_ids), run.raw_model.num_patches, generator=torch.Generator().manual_seed(0))
    run.stage_starts = [sum(args.stage_epochs[:s]) for s in range(args.stages)]
    if run.ckpt:
        refuse_moved_stages(run)
    if run.is_main:
        announce(run)
    checkpoints.announce_world_size(run, run.steps_per_epoch)
    runtime.write_flags(run, effective_batch=run.eff_batch, peak_lr=run.peak_lr, steps_per_epoch=run.steps_per_epoch)
    run.warmup_steps = [warmup_steps(args.warmup_epochs, epochs, run.steps_per_epoch, run.is_main)
                        for epochs in args.stage_epochs]  # each stage warms up afresh
    return run


def refuse_moved_stages(run):
    """A resumed run keeps the stages it has begun where they began (a stage's student, teacher and schedule start
    there), and its current stage may end no earlier than the epoch it has reached: --stage_epochs and --epochs may
    change only the stages ahead and the current one's length."""
    begun = run.stage_starts[:run.stage + 1]
    saved = run.ckpt['args']['stage_epochs']
    before = [sum(saved[:s]) for s in range(run.stage + 1)]
    end = run.stage_starts[run.stage] + run.args.stage_epochs[run.stage]
    if begun != before or run.start_epoch > end:
        runtime.fail(f'{run.resume} is in stage {run.stage} at epoch {run.start_epoch} of --stage_epochs '
                     f'{",".join(map(str, saved))}: the new --stage_epochs {",".join(map(str, run.args.stage_epochs))} '
                     f'(from --epochs {run.args.epochs}, or given) must keep the stages begun as they began and end '
                     f'stage {run.stage} at epoch {run.start_epoch} or later; change only the stages ahead, or start '
                     f'afresh with another --output_dir')


def build_model(run):
    """The teacher (a checkpoint's when resuming), the model fitted to it, and a fresh optimizer."""
    args, ckpt = run.args, run.ckpt
    method = METHODS[args.method]
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    try:  # impossible configurations surface as ValueError from the method: one line, no traceback
        teacher = method.build_teacher(args, checkpoints.saved_teacher(run) if ckpt else None)
        run.raw_model = method.from_args(args, teacher).to(run.device)
    except ValueError as e:
        runtime.fail(e)
    run.teacher = teacher.to(run.device) if teacher is not None else None
    run.eff_batch = args.batch_size * args.accum_iter * run.world_size
    run.peak_lr = args.lr or args.blr * run.eff_batch / 256
    refuse_rising_lr(args, run.peak_lr, run.eff_batch)
    run.optimizer = build_optimizer(run.raw_model, args, run.peak_lr)


def wrapped(run):
    """What the steps call: the model compiled (--compile) and, with several processes, in DDP."""
    model = torch.compile(run.raw_model, mode=run.args.compile) if run.args.compile else run.raw_model
    if run.world_size > 1:
        # gradients as views of DDP's buckets: no second copy of them (0.4 / 1.2 / 2.4 GiB at ViT-B / L / H). A static
        # graph (every method uses every parameter in every step, and a stage switch that changes the parameters
        # wraps the model anew) lets DDP fix its buckets after the first step, but it fails on the no_sync() of
        # gradient accumulation (an internal assert in torch 2.14's reducer): only without --accum_iter.
        model = DDP(model, device_ids=[run.device.index] if run.device.type == 'cuda' else None,
                    gradient_as_bucket_view=True, static_graph=run.args.accum_iter == 1)
        if run.device.type == 'cpu':  # MCMAE's 1x1 and depthwise convolutions get gradients whose strides differ
            # from their buckets' only along dimensions of size 1 (the same memory layout): nothing to act on
            warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    return model


def flops_per_image(model, teacher, args, device):
    """Training FLOPs of one image (the model's forward and backward, the teacher's forward), for MFU."""
    count = flops.per_image(lambda imgs: forward_backward(model, teacher, imgs, args.mask_ratio, nullcontext()),
                            args.img_size, device)
    model.zero_grad(set_to_none=True)
    return count


def announce(run):
    args = run.args
    if run.stage:  # resumed past a stage switch: the file no longer teaches
        print(f'teacher: the stage-{run.stage - 1} student (teacher-stage{run.stage}.pth)')
    elif args.teacher not in (None, 'random'):  # which file teaches, and which loss term belongs to which file
        print(f'teacher: {args.teacher}' + ''.join(f'; loss_mimic_{name} <- {source["weights"]}'
                                                   for name, source in getattr(run.teacher, 'sources', {}).items()))
    n_params = sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad)
    print(f'{args.method} {args.model}: {n_params / 1e6:.1f}M trainable parameters; {len(run.images.dataset)} images; '
          f'{run.world_size} process(es) on {run.device}; effective batch {run.eff_batch}; peak lr {run.peak_lr:.3g}')


# -----------------------------------------------------------------------------------------------------------------
# Logging: the loss between log points, and figures

class EpochTally:
    """An epoch's running sums, kept on the device so that no step waits for it (the loss and its terms over the
    micro-batches, the first step whose loss was not finite), the steps skipped, and the progress bar; read back
    only at log points and at the end. At each log point (--log_every) the bar shows the loss so far, and
    steps.jsonl gets the window since the previous one: the loss and its terms averaged over its steps and every
    rank, so that a short run has a curve and a long one shows what an epoch's mean hides. A row names the steps
    [first_step, end_step) of its epoch that it averages: a signal's stop ends a window early, and the resumed run
    starts the next one there."""

    def __init__(self, run, epoch, first_step, position):
        self.run, self.epoch, self.first_step = run, epoch, first_step
        self.loss_sum, self.term_sums = torch.zeros((), device=run.device), {}
        if position:  # the sums of the steps before a signal stopped this epoch
            self.loss_sum = position['loss_sum'].to(run.device)
            self.term_sums = {name: value.to(run.device) for name, value in position['term_sums'].items()}
        self.nonfinite_step, self.skipped_steps = torch.full((), -1, device=run.device), 0
        self.start_time, self.window = time.perf_counter(), self.window_from(first_step)
        self.bar = tqdm(total=run.steps_per_epoch, initial=first_step, desc=f'epoch {epoch}',
                        disable=not run.is_main or not runtime.in_a_terminal(), dynamic_ncols=True)

    def add(self, step, loss, terms):
        self.nonfinite_step = torch.where((self.nonfinite_step < 0) & ~torch.isfinite(loss), step, self.nonfinite_step)
        self.loss_sum += loss
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0) + value
        self.bar.update()

    def skip(self):
        """--skip_nonfinite: a step whose loss was not finite is dropped, up to the limit per epoch."""
        self.skipped_steps += 1
        limit = self.run.args.skip_nonfinite
        if self.skipped_steps > limit:
            runtime.fail(f'{self.skipped_steps} non-finite losses in epoch {self.epoch}, more than --skip_nonfinite '
                         f'{limit}; {runtime.last_good_checkpoint(self.run.out)}')

    def log_point(self, steps_done, lr):
        """The loss so far, lr, speed (and MFU on GPUs) on the bar, and the window since the last log point."""
        run, (first_step, start_time) = self.run, (self.window['first_step'], self.window['time'])
        img_per_s = (steps_done - first_step) * run.eff_batch / (time.perf_counter() - start_time)
        self.close_window(steps_done)
        mean_loss = self.loss_sum.item() / ((steps_done - self.skipped_steps) * run.args.accum_iter)
        postfix = dict(loss=f'{mean_loss:.4f}', lr=f'{lr:.2e}', img_s=f'{img_per_s:.0f}')
        if run.peak_flops:
            postfix['mfu'] = f'{flops.mfu(img_per_s, run.flops, run.peak_flops, run.world_size):.1%}'
        self.bar.set_postfix(postfix)  # shown at the last step too, so that short epochs show it
        if run.is_main and self.bar.disable:  # a log file: one line per log point
            print(f'epoch {self.epoch} step {steps_done}/{run.steps_per_epoch}: '
                  + ' '.join(f'{k}={v}' for k, v in postfix.items()), file=sys.stderr, flush=True)

    def window_from(self, step):
        return dict(first_step=step, time=time.perf_counter(), loss_sum=self.loss_sum.clone(),  # grows in place
                    term_sums=dict(self.term_sums), skipped_steps=self.skipped_steps)

    def close_window(self, end_step):
        """Check the steps so far, write the window that ends before end_step to steps.jsonl (rank 0 writes; every
        rank calls: a signal's stop, too) and start the next one there."""
        run, window = self.run, self.window
        runtime.check_finite(self.nonfinite_step, self.epoch, run.out)
        steps = end_step - window['first_step'] - (self.skipped_steps - window['skipped_steps'])
        if steps > 0:
            sums = dict(loss=self.loss_sum - window['loss_sum'], **{
                name: total - window['term_sums'].get(name, 0) for name, total in self.term_sums.items()})
            means = runtime.means_over_ranks(sums, steps * run.args.accum_iter)
            if run.is_main:
                with open(run.out / 'steps.jsonl', 'a') as f:
                    f.write(json.dumps(dict(epoch=self.epoch, stage=run.stage, first_step=window['first_step'],
                                            end_step=end_step, steps_per_epoch=run.steps_per_epoch, **means)) + '\n')
                run.board.scalars('steps', means, self.epoch * run.steps_per_epoch + end_step)
        self.window = self.window_from(end_step)

    def epoch_row(self, lr):
        """The epoch's log row: losses averaged over every rank's micro-batches, speed, counted FLOPs, skipped work."""
        run = self.run
        self.bar.close()
        runtime.check_finite(self.nonfinite_step, self.epoch, run.out)
        img_per_s = (run.steps_per_epoch - self.first_step) * run.eff_batch / (time.perf_counter() - self.start_time)
        micro_batches = (run.steps_per_epoch - self.skipped_steps) * run.args.accum_iter
        means = runtime.means_over_ranks(dict(loss=self.loss_sum, **self.term_sums), micro_batches)
        row = dict(epoch=self.epoch, stage=run.stage, loss=means.pop('loss'), lr=lr, img_per_s=round(img_per_s, 1),
                   gflops_per_img=round(run.flops / 1e9, 6), **means)
        if run.peak_flops:
            row['mfu'] = round(flops.mfu(img_per_s, run.flops, run.peak_flops, run.world_size), 4)
        unreadable = getattr(run.images.dataset, 'unreadable', torch.zeros(0))  # per file, on any rank (CIFAR: none)
        return dict(row, skipped_steps=self.skipped_steps, skipped_images=int(sum(runtime.max_over_ranks(unreadable))))


class Board:
    """--tensorboard: the numbers of steps.jsonl and log.jsonl also as TensorBoard scalars (steps/..., epoch/...) in
    OUTPUT_DIR/tensorboard, at the optimizer step they end at (rank 0; elsewhere, and without the flag, it writes
    nothing). A resumed run first purges what the stopped one wrote after its checkpoint (purge_step), as restore_log
    cuts the logs; each epoch's row flushes the file, so that a kill loses nothing a checkpoint covers."""

    def __init__(self, out, first_step):
        """first_step: the first optimizer step (from 1) that the run is yet to take."""
        self.writer = None
        if out is not None:
            from torch.utils.tensorboard import SummaryWriter  # checked at the start: validate_args
            self.writer = SummaryWriter(out / 'tensorboard', purge_step=first_step)

    def scalars(self, group, values, step):
        for name, value in values.items():
            if self.writer and isinstance(value, (int, float)) and name not in ('epoch', 'stage'):
                self.writer.add_scalar(f'{group}/{name}', value, step)

    def epoch(self, row, step):
        self.scalars('epoch', row, step)
        if self.writer:
            self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *error):
        if self.writer:
            self.writer.close()


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
# Flag checks: every flag before any work starts

METHOD_FLAGS = sorted(set().union(*(method.flags for method in METHODS.values())))  # each method's own, declared there


# Flags that only one kind of teacher reads (a file teacher reads none of them)
TEACHER_FLAGS = {'clip': ('clip_model', 'clip_weights', 'clip_quick_gelu'), 'dino': ('dino_model', 'dino_weights'),
                 'random': ('teacher_depth',)}


# Flags of the common model group that a method ignores: dBOT's targets are a teacher's features, never pixels
IGNORED_BY = {'dbot': ('norm_pix_loss',)}


def refuse_unused_flags(args):
    """A flag the method, or its teacher, ignores would silently change nothing: say so instead."""
    defaults = get_args_parser()
    for flag in IGNORED_BY.get(args.method, ()):
        if getattr(args, flag) != defaults.get_default(flag):
            runtime.fail(f'--{flag} (or --no-{flag}): {args.method} does not use it (its targets are features)')
    for flag in METHOD_FLAGS:
        if flag not in METHODS[args.method].flags and getattr(args, flag) != defaults.get_default(flag):
            users = ', '.join(sorted(name for name, m in METHODS.items() if flag in m.flags))
            runtime.fail(f'--{flag}: {args.method} does not use it (it is for {users})')
    args.teacher = args.teacher or DEFAULT_TEACHER.get(args.method)
    kinds = args.teacher.split('+') if args.teacher else []
    for kind, teacher_flags in TEACHER_FLAGS.items():
        for flag in teacher_flags:
            if kind not in kinds and flag in METHODS[args.method].flags and \
                    getattr(args, flag) != defaults.get_default(flag):
                runtime.fail(f'--{flag}: the teacher {args.teacher} does not use it (it is for a {kind} teacher)')


def validate_args(args):
    """Every flag checked before any work starts: a bad one ends the run in one line naming it. Each number's own range
    is declared at the flag (flags.Range); what is checked here is how flags fit together."""
    method = METHODS[args.method]
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (it imports the tensorboard package)
        except ImportError:
            runtime.fail('--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard, '
                         'or leave the flag out (log.jsonl and steps.jsonl hold the same numbers)')
    if args.img_size % args.patch_size:
        runtime.fail(f'--img_size {args.img_size} is not divisible by --patch_size {args.patch_size}')
    tokens = (args.img_size // args.patch_size) ** 2
    visible = int(tokens * (1 - args.mask_ratio))  # as the model keeps them (mae.MAE.random_masking)
    if not 0 < visible < tokens:
        runtime.fail(f'--mask_ratio {args.mask_ratio} of the {tokens} patches of a {args.img_size} px image in '
                     f'{args.patch_size} px patches leaves {visible} visible and {tokens - visible} hidden: the '
                     f'encoder needs at least one of each (a lower ratio, or smaller patches)')
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        runtime.fail(f'--decoder_dim {args.decoder_dim} must be divisible by --decoder_heads {args.decoder_heads} and '
                     f'by 4 (its sin-cos position code)')
    flags.check_pipelines(args)
    flags.check_data_dir(args, get_args_parser())
    flags.check_device(args.device)
    flags.check_compile(args)
    depth = mae.VIT_SIZES[args.model]['depth']
    if args.teacher_depth is not None and args.teacher_depth > depth:
        runtime.fail(f'--teacher_depth {args.teacher_depth}: {args.model} has {depth} blocks to keep (0 to {depth})')
    if args.fusion_layers > depth:
        runtime.fail(f'--fusion_layers {args.fusion_layers}: {args.model} has {depth} blocks to mix')
    if args.stages is None:
        args.stages = len(args.stage_epochs) if args.stage_epochs else method.default_stages
    if args.stage_epochs:
        if len(args.stage_epochs) != args.stages:
            runtime.fail(f'--stage_epochs {args.stage_epochs} must give {args.stages} epoch counts, one per stage')
        if args.epochs is not None and args.epochs != sum(args.stage_epochs):
            runtime.fail(f'--epochs {args.epochs} disagrees with --stage_epochs {args.stage_epochs} '
                         f'({sum(args.stage_epochs)} in all): give one of them')
        args.epochs = sum(args.stage_epochs)
    else:
        args.epochs = 200 if args.epochs is None else args.epochs
        if args.epochs < args.stages:
            runtime.fail(f'--epochs {args.epochs} is fewer than --stages {args.stages}')
        # an even split; the last stages take the remainder
        args.stage_epochs = [args.epochs // args.stages + (s >= args.stages - args.epochs % args.stages)
                             for s in range(args.stages)]
    if not all(epoch <= args.epochs for epoch in args.save_epochs):
        runtime.fail(f'--save_epochs {",".join(map(str, args.save_epochs))}: each must be an epoch of this run (1 to '
                     f'{args.epochs})')


def main(args):
    refuse_unused_flags(args)
    validate_args(args)
    with checkpoints.one_run(args.output_dir):
        pretrain(args)


if __name__ == '__main__':
    runtime.script(lambda: main(get_args_parser().parse_args()))
