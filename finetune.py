"""
Fine-tuning, linear probing and k-NN evaluation of an encoder pre-trained here (any method), a dBOT teacher file, or
a timm-format ViT state dict; `--checkpoint none` trains the same architecture from scratch, the baseline.

    python finetune.py --checkpoint output/checkpoint-last.pth --data /path/to/tiny-imagenet-200
    python finetune.py --checkpoint output/checkpoint-last.pth --data ... --mode linprobe
    python finetune.py --checkpoint output/checkpoint-last.pth --data ... --mode knn
    torchrun --nproc_per_node 8 finetune.py --checkpoint ... --data /path/to/imagenet --img_size 224

The defaults are MAE's recipes for base models (SPEC §5); docs/evaluation.md gives the small recipe for
Tiny-ImageNet. Read evaluate_encoder first: it is the table of contents. The frozen modes' features, k-NN and
linear classifier are in frozen.py; data sets come from data.py, processes and signals from runtime.py, checkpoints
from checkpoints.py (as in train.py), and the lr schedule and the method registry from train.py.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoints
import data
import flags
import frozen
import runtime
import train
from mae import VIT_SIZES, ViT, encoder_state_dict
from teachers import build_conv_vit, build_vit, read_encoder_state_dict, resize_pos_embed, sha256


# Per mode: MAE's fine-tuning recipe (§A.3: AdamW, layer decay, RandAugment, mixup/cutmix, label smoothing, random
# erasing) and its linear probe (§A.4, with SGD + momentum instead of LARS). Explicit flags override these.
MODE_DEFAULTS = {
    'finetune': dict(epochs=100, warmup_epochs=5, blr=5e-4, weight_decay=0.05, head_init_std=2e-5),
    'linprobe': dict(epochs=90, warmup_epochs=10, blr=0.1, weight_decay=0.0, head_init_std=0.01),
    # k-NN trains no head; --mode frozen's classifier on cached features starts as the linear probe's
    'knn': dict(epochs=0, warmup_epochs=0, blr=0.0, weight_decay=0.0, head_init_std=0.01),
    'frozen': dict(epochs=90, warmup_epochs=10, blr=0.1, weight_decay=0.0, head_init_std=0.01),  # SGD on the features
}


def get_args_parser():
    parser = flags.ArgumentParser('Fine-tuning, linear probe and k-NN evaluation')
    parser.add_argument('--checkpoint', type=flags.text, required=True,
                        help='train.py checkpoint (any method), dBOT teacher-stageK.pth, timm ViT state dict, or none')
    parser.add_argument('--mode', default='finetune', choices=sorted(MODE_DEFAULTS))
    parser.add_argument('--data', type=flags.text, required=True,
                        help='as train.py: cifar10, cifar100, or an ImageFolder with val/')
    parser.add_argument('--data_dir', type=flags.text, default='./data')
    parser.add_argument('--num_workers', default=flags.default_workers(), type=flags.AMOUNT, help='as train.py')
    # architecture: from the checkpoint; these only for --checkpoint none (or to change the resolution)
    parser.add_argument('--method', default='mae', choices=sorted(train.METHODS),
                        help='--checkpoint none: whose encoder to build (mcmae/mrmcmae: the hybrid)')
    parser.add_argument('--model', default=None, choices=sorted(VIT_SIZES))
    parser.add_argument('--patch_size', default=None, type=flags.PIXELS)
    parser.add_argument('--img_size', default=None, type=flags.PIXELS, help='default: the pre-training size; '
                        'a different one resamples the position embedding (bicubic)')
    parser.add_argument('--nb_classes', default=None, type=flags.Range(int, 2, 2 ** 31 - 1),
                        help='default: inferred from the data')
    # optimisation (defaults per --mode, see MODE_DEFAULTS)
    parser.add_argument('--epochs', default=None, type=flags.COUNT)
    parser.add_argument('--warmup_epochs', default=None, type=flags.AMOUNT)
    parser.add_argument('--batch_size', default=128, type=flags.COUNT, help='per process')
    parser.add_argument('--blr', default=None, type=flags.RATE,
                        help='lr = blr * batch / 256 (dBOT fine-tunes with 3e-4)')
    parser.add_argument('--lr', default=None, type=flags.RATE)
    parser.add_argument('--min_lr', default=1e-6, type=flags.NONNEGATIVE)
    parser.add_argument('--weight_decay', default=None, type=flags.NONNEGATIVE)
    parser.add_argument('--layer_decay', default=0.65, type=flags.Range(float, 0, 1, open_low=True),
                        help='0.65 base, 0.75 large/huge')
    parser.add_argument('--drop_path', default=0.1, type=flags.FRACTION)
    parser.add_argument('--clip_grad', default=None, type=flags.Range(float, 0, 1e6, open_low=True))
    parser.add_argument('--head_init_std', default=None, type=flags.FRACTION,
                        help='std of the new head\'s trunc-normal weights (MAE, ConvMAE: 2e-5; dBOT: 0.01)')
    # fine-tuning augmentation (timm's implementations)
    # MAE uses rand-m9-mstd0.5-inc1, but timm's increasing posterize (1.0.31) asks Pillow for 0 bits at the top
    # magnitude, which Pillow 13 refuses, killing the data loader; the plain policy posterizes to 4-8 bits.
    parser.add_argument('--aa', type=flags.text, default='rand-m9-mstd0.5',
                        help='RandAugment policy (MAE: rand-m9-mstd0.5-inc1)')
    parser.add_argument('--reprob', default=0.25, type=flags.FRACTION, help='random erasing probability')
    parser.add_argument('--mixup', default=0.8, type=flags.NONNEGATIVE)
    parser.add_argument('--cutmix', default=1.0, type=flags.NONNEGATIVE)
    parser.add_argument('--smoothing', default=0.1, type=flags.FRACTION)
    parser.add_argument('--crop_pct', default=224 / 256, type=flags.Range(float, 0.05, 1),
                        help='evaluation centre crop (1.0 for tiny images)')
    # linear probe and k-NN
    parser.add_argument('--pool', default=None, choices=['cls', 'mean'],
                        help='frozen features: cls token (default for ViTs) or mean of the patch tokens')
    parser.add_argument('--knn_k', default=20, type=flags.COUNT)
    parser.add_argument('--knn_t', default=0.07, type=flags.Range(float, 0, 1e3, open_low=True),
                        help='temperature of the k-NN vote weights')
    # system and output
    parser.add_argument('--seed', default=0, type=flags.SEED)
    parser.add_argument('--device', type=flags.text, default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default=None, choices=['bf16', 'fp32'],
                        help='bf16 autocast or plain fp32 (default: bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--output_dir', type=flags.text, default=None,
                        help='default: ./output/MODE, one folder per mode')
    parser.add_argument('--resume', type=flags.text, default=None)
    parser.add_argument('--export_timm', type=flags.text, default=None,
                        help='write the encoder (with its head after fine-tuning) as '
                        'a timm VisionTransformer state dict: PATH.safetensors (as the hub), or a .pth pickle')
    return parser


# What each flag may change when a run resumes (flags.OnResume): a flag named nowhere here is the run's identity.
# --num_workers is free: every image augments from its own seeds (data.ImageSeeds), whichever worker decodes it.
ON_RESUME = flags.OnResume(
    free=('data_dir', 'num_workers', 'device', 'output_dir', 'resume', 'export_timm', 'knn_k', 'knn_t',
          'head_init_std'),  # the head's initial weights: a resumed run has trained its head already
    schedule=('epochs', 'warmup_epochs', 'blr', 'lr', 'min_lr', 'weight_decay', 'layer_decay', 'drop_path',
              'clip_grad', 'aa', 'reprob', 'mixup', 'cutmix', 'smoothing', 'crop_pct', 'precision'),
    position=('batch_size', 'seed'))

# Flags that only some modes read; every other flag applies in every mode. Given in another mode, one is refused.
TRAINED = ('finetune', 'linprobe', 'frozen')  # the modes that train a classifier
MODE_FLAGS = dict(
    epochs=TRAINED, warmup_epochs=TRAINED, blr=TRAINED, lr=TRAINED, min_lr=TRAINED, weight_decay=TRAINED,
    head_init_std=TRAINED, seed=TRAINED, nb_classes=TRAINED, clip_grad=('finetune', 'linprobe'), resume=('finetune', 'linprobe'),
    layer_decay=('finetune',), drop_path=('finetune',), aa=('finetune',), reprob=('finetune',), mixup=('finetune',),
    cutmix=('finetune',), smoothing=('finetune',),
    pool=('linprobe', 'knn', 'frozen'), knn_k=('knn', 'frozen'), knn_t=('knn', 'frozen'))


# -----------------------------------------------------------------------------------------------------------------
# The evaluation: the encoder, then k-NN and the frozen-feature classifier, or every epoch of training

def evaluate_encoder(args):
    """The run, its flags already checked and its output folder held (main): the encoder and the data, then either
    k-NN, or set-up and resume, train_one_epoch and end_epoch for every epoch, and the export."""
    rank, world_size, device = runtime.init_distributed(args.device)
    run = Run(args, rank, world_size, device, runtime.autocast_for(args, device))
    torch.manual_seed(args.seed)
    run.encoder = load_encoder(args)
    if args.export_timm and type(run.encoder) is not ViT:
        runtime.fail(f'--export_timm: timm has no {type(run.encoder).__name__}; only ViT encoders export')
    if args.pool is None:
        args.pool = 'cls' if run.encoder.num_prefix_tokens else 'mean'
    if args.pool == 'cls' and not run.encoder.num_prefix_tokens:
        runtime.fail(f'--pool cls: the {args.method} encoder has no cls token; use --pool mean')
    build_data(run)
    run.model = run.raw_model = Classifier(run.encoder, run.num_classes, args.mode, args.pool,
                                           args.head_init_std).to(run.device)
    if args.mode in ('knn', 'frozen'):
        return evaluate_frozen(run)
    set_up_training(run)
    if not checkpoints.finished_already(run, args.epochs):
        with runtime.deferring_signals():  # a signal now stops the run after a step, with its position saved
            for epoch in range(run.start_epoch, args.epochs):
                runtime.seed_everything(args.seed, epoch, run.rank)  # as train.py: resume without stored RNG state
                row = train_one_epoch(run, epoch)
                if row is None:  # stopped by a signal
                    return
                end_epoch(run, epoch, row)
    if run.is_main:
        print(f'best val top-1: {run.best_acc1:.2f}%')
        if args.export_timm:
            export_timm(run.raw_model if args.mode == 'finetune' else None, run.encoder, args.export_timm)


def train_one_epoch(run, epoch):
    """One epoch of fine-tuning or linear probing, from the step a signal stopped it at if it did. -> the epoch's log
    row (validation included), or None when a signal stops the run (its exact position is then in the checkpoint)."""
    args, device = run.args, run.device
    total_steps = args.epochs * run.steps_per_epoch
    first_step, position = checkpoints.epoch_start(run, epoch)
    loss_sum = position['loss_sum'].to(device) if position else torch.zeros((), device=device)
    run.sampler.set_epoch(epoch)
    run.sampler.start = first_step * args.batch_size
    run.model.train()
    if args.mode == 'linprobe':
        run.raw_model.encoder.eval()  # frozen features
    epoch_start = time.perf_counter()
    batches = iter(run.loader)  # draws the loader's base seed from the RNG: restore the state after it
    if position:
        runtime.restore_rng_states(position['rng_state'], device)
    stop_vote = runtime.StopVote(first_step, run.world_size)
    progress = tqdm(batches, desc=f'epoch {epoch}', initial=first_step, total=run.steps_per_epoch,
                    disable=not run.is_main or not runtime.in_a_terminal())
    for step, (imgs, labels) in enumerate(progress, start=first_step):
        lr = train.lr_at(epoch * run.steps_per_epoch + step, total_steps, run.warmup_steps, run.peak_lr, args.min_lr)
        for group in run.optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if run.mixup:
            imgs, labels = run.mixup(imgs, labels)
        with run.autocast:
            loss = run.criterion(run.model(imgs), labels)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if (step + 1) % 50 == 0 or step + 1 == run.steps_per_epoch:  # a host sync: only now and then
            postfix = dict(loss=f'{loss_sum.item() / (step + 1):.4f}', lr=f'{lr:.2e}')
            progress.set_postfix(postfix)
            if run.is_main and progress.disable:  # a log file: one line per log point
                print(f'epoch {epoch} step {step + 1}/{run.steps_per_epoch}: '
                      + ' '.join(f'{k}={v}' for k, v in postfix.items()), file=sys.stderr, flush=True)
        if stop_vote.stops_after(step, run.steps_per_epoch):  # checkpoint, exit 0
            checkpoints.save_mid_epoch(run, run_state(run), epoch, step + 1, loss_sum=loss_sum)
            return None
    train_loss = runtime.all_reduce_mean(loss_sum / run.steps_per_epoch).item()
    if not math.isfinite(train_loss):
        runtime.fail(f'training loss is {train_loss} in epoch {epoch}; {runtime.last_good_checkpoint(run.out)}')
    seconds = time.perf_counter() - epoch_start
    return dict(epoch=epoch, train_loss=train_loss, lr=lr,
                img_per_s=round((run.steps_per_epoch - first_step) * run.eff_batch / seconds, 1),
                **evaluate(run.raw_model, run.val_loader, device, run.autocast))


def end_epoch(run, epoch, row):
    """The end of an epoch: the checkpoint (and checkpoint-best.pth when top-1 improved), then the log row."""
    best = [run.out / 'checkpoint-best.pth'] if row['val_acc1'] > run.best_acc1 else []
    run.best_acc1 = max(run.best_acc1, row['val_acc1'])
    run.last_row = row
    checkpoints.save_epoch(run, run_state(run), epoch, also=best)


def run_state(run):
    """What a checkpoint holds besides its position: weights, optimizer, the best top-1 so far, flags and log row."""
    return dict(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(), best_acc1=run.best_acc1,
                args=vars(run.args), identity=run.identity, world_size=run.world_size, log_row=run.last_row,
                begun_from=run.begun_from)


# -----------------------------------------------------------------------------------------------------------------
# Evaluation on frozen features, and on the validation set

def evaluate_frozen(run):
    """--mode knn (k-NN) and --mode frozen (k-NN and a linear classifier on the same cached features): no training of
    the encoder. Under several processes each rank extracts its shard's features; rank 0 votes, trains the classifier
    and reports. The result names the k it really used and the images it counted."""
    args = run.args
    if (run.out / 'checkpoint-last.pth').exists():  # a training run's folder, whose log a resume would rewrite
        runtime.fail(f'--output_dir {run.out} holds a training run (checkpoint-last.pth): give --mode {args.mode} a '
                     f'folder of its own')
    start = time.perf_counter()
    features = cached_features(run)
    if not run.is_main:
        return
    train_x, train_y, val_x, val_y = features
    k = min(args.knn_k, len(train_x))
    row = dict(mode=args.mode, k=k, checkpoint=args.checkpoint, train_images=len(train_x), val_images=len(val_x),
               **frozen.knn_evaluate(train_x, train_y, val_x, val_y, run.num_classes, k, args.knn_t))
    if args.mode == 'frozen':
        linear = frozen.linear_on_features(train_x, train_y, val_x, val_y, run.num_classes, args)
        row.update(knn_acc1=row.pop('val_acc1'), knn_acc5=row.pop('val_acc5'), linear_epochs=args.epochs,
                   linear_acc1=linear['val_acc1'], linear_acc5=linear['val_acc5'])
    row['seconds'] = round(time.perf_counter() - start, 1)
    with open(run.out / 'log.jsonl', 'a') as f:
        f.write(json.dumps(row) + '\n')
    fewer = f', all {k} training images: fewer than --knn_k {args.knn_k}' if k < args.knn_k else ''
    left_out = sum(int(data.unreadable(dataset).sum()) for dataset in (run.train_set, run.val_set))
    counted = f' ({left_out} unreadable image(s) left out, named above)' if left_out else ''
    knn_acc1, knn_acc5 = row.get('knn_acc1', row.get('val_acc1')), row.get('knn_acc5', row.get('val_acc5'))
    print(f'k-NN (k={k}{fewer}) of {args.method}/{args.model} from {args.checkpoint}, {len(val_x)} validation '
          f'images{counted}: top-1 {knn_acc1:.2f}%, top-5 {knn_acc5:.2f}%')
    if args.mode == 'frozen':
        print(f'linear classifier on the cached features ({args.epochs} epochs): top-1 {row["linear_acc1"]:.2f}%, '
              f'top-5 {row["linear_acc5"]:.2f}%')
    if args.export_timm:
        export_timm(None, run.encoder, args.export_timm)


def cached_features(run):
    """frozen.cached_features, keyed by what the features are of: the checkpoint's content, the architecture, the
    pooling, the data's files (names, sizes, times: images added or replaced make new features), the image size and
    crop (not the mode: k-NN and the linear classifier read the same ones)."""
    key = {name: value for name, value in run_identity(run.args).items() if name != 'mode'}
    key.update(crop_pct=run.args.crop_pct, precision=run.args.precision,
               train_files=data.fingerprint(run.train_set, with_sizes=True),
               val_files=data.fingerprint(run.val_set, with_sizes=True))
    return frozen.cached_features(run.model, run.train_set, run.val_set, key, run.out / 'features.pt', run)


@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Cross-entropy, top-1 and top-5 accuracy (%) over every readable validation image, each counted once (summed
    over all ranks), and how many they were. `model`: the classifier itself, not its DDP wrapper: shards may differ by
    a batch, and an evaluation needs no collective but the sum."""
    model.eval()
    sums = torch.zeros(4, device=device)  # loss, top-1, top-5, count
    for batch in loader:
        if batch is None:  # every image of the batch was unreadable
            continue
        imgs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast:
            logits = model(imgs)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction='sum'),
                             (top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(dim=1).sum(),
                             torch.tensor(len(labels), device=device)]).float()
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, count = sums.tolist()
    if not count:
        runtime.fail('no validation image could be read: every file of val/ failed to decode')
    return dict(val_loss=loss / count, val_acc1=100 * top1 / count, val_acc5=100 * top5 / count,
                val_images=int(count))


# -----------------------------------------------------------------------------------------------------------------
# The encoder and the classifier (MAE §A.3, §A.4)

def load_encoder(args):
    """The encoder, with its pre-trained weights (read_pretrained), or freshly initialised for --checkpoint none.
    Fills in args.method/model/patch_size/img_size from the pre-training where the flags leave them open."""
    pretrain, state = read_pretrained(args) if args.checkpoint != 'none' else ({}, None)
    args.method = pretrain.get('method', args.method)
    for key in ('model', 'patch_size', 'img_size'):
        if getattr(args, key) is None:
            setattr(args, key, pretrain.get(key))
    if None in (args.model, args.patch_size, args.img_size):
        runtime.fail('--checkpoint none needs --model, --patch_size and --img_size')
    encoder_class = train.METHODS[args.method].encoder_class
    try:
        encoder = encoder_class(args.img_size, args.patch_size, **VIT_SIZES[args.model],
                                drop_path=args.drop_path if args.mode == 'finetune' else 0.0)
    except ValueError as e:
        runtime.fail(e)
    if state is None:
        encoder.initialize_weights()
        return encoder
    state['pos_embed'] = resize_pos_embed(state['pos_embed'], encoder.grid_size, encoder.num_prefix_tokens)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        runtime.fail(f'--checkpoint {args.checkpoint} does not fit {encoder_class.__name__} '
                     f'{args.model}/{args.patch_size}: '
                     + ' '.join(str(e).split())[:600])
    return encoder


def read_pretrained(args):
    """-> (the pre-training's flags, the encoder's weights) of --checkpoint: ours (train.py's, and finetune.py's own
    checkpoints, whose classifier head is left behind) name the flags in their saved args;
    a timm-format ViT state dict (an --export_timm file, DINO's, an official MAE checkpoint) tells them by its
    weights."""
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    saved_args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(saved_args, argparse.Namespace):  # the official MAE, dBOT and ConvMAE code pickle theirs
        saved_args = vars(saved_args)
    if isinstance(saved_args, dict) and 'mode' in saved_args:  # finetune.py's own: its classifier's encoder
        return saved_args, with_final_norm({k.removeprefix('encoder.'): v for k, v in checkpoint['model'].items()
                                            if k.startswith('encoder.')}, args)
    if isinstance(saved_args, dict) and 'method' in saved_args:  # train.py's
        return saved_args, encoder_state_dict(checkpoint['model'])
    try:
        state = read_encoder_state_dict(args.checkpoint, hybrid=True, classifier=True)  # with_final_norm decides
    except ValueError as e:
        runtime.fail(f'--checkpoint {e}; expected a train.py checkpoint or a ViT or MCMAE state dict')
    state = with_final_norm(state, args)
    hybrid = 'patch_embed.stem1.proj.weight' in state  # MCMAE's encoder (ours or the official ConvMAE code's)
    # Its pre-training size: an official checkpoint's pickled --input_size, else the position embedding's grid times
    # the patch size (a bare state dict names no size).
    grid = int((state['pos_embed'].shape[1] - (not hybrid)) ** 0.5)
    stem = state['patch_embed.stem1.proj.weight' if hybrid else 'patch_embed.proj.weight']
    patch = stem.shape[-1] * (4 if hybrid else 1)  # the hybrid's stem strides a quarter of its patch
    img_size = args.img_size or (saved_args or {}).get('input_size') or grid * patch
    try:
        encoder = build_conv_vit(state, img_size) if hybrid else build_vit(state, img_size)
    except ValueError as e:
        runtime.fail(f'--checkpoint {args.checkpoint}: {e}')
    width, depth = encoder.norm.normalized_shape[0], len(encoder.blocks) + hybrid  # the hybrid: depth - 1 blocks
    model = next((n for n, size in VIT_SIZES.items() if (size['embed_dim'], size['depth']) == (width, depth)), None)
    if model is None:
        runtime.fail(f'--checkpoint {args.checkpoint}: an encoder of width {width} and depth {depth} matches none of '
                     f'{sorted(VIT_SIZES)}')
    return dict(method='mcmae' if hybrid else 'mae', patch_size=patch, img_size=img_size, model=model), state


def with_final_norm(state, args):
    """A fine-tuned classifier's encoder has fc_norm and a head in place of its final norm: fine-tuning it again
    replaces that norm anyway (an identity one stands in); frozen features would lack it, so those modes refuse."""
    if 'norm.weight' in state:
        return state
    if args.mode != 'finetune':
        runtime.fail(f'--checkpoint {args.checkpoint} is a fine-tuned classifier (it has no final norm): --mode '
                     f'{args.mode} needs a pre-trained encoder')
    width = state['pos_embed'].shape[-1]
    return dict(state, **{'norm.weight': torch.ones(width), 'norm.bias': torch.zeros(width)})


class Classifier(nn.Module):
    """Fine-tuning (MAE §A.3): the mean of the last block's patch tokens, a LayerNorm (fc_norm) and a linear head;
    the encoder's final norm goes unused, so it is dropped (timm's global_pool='avg' layout). Linear probe (§A.4):
    frozen features after the final norm (cls token or mean), a BatchNorm without affine, and a linear head."""

    def __init__(self, encoder, num_classes, mode, pool, head_init_std):
        super().__init__()
        self.encoder, self.mode, self.pool = encoder, mode, pool
        width = encoder.norm.normalized_shape[0]
        if mode == 'finetune':
            encoder.norm = nn.Identity()
            encoder.pos_embed.requires_grad_(True)  # fixed in pre-training; the official fine-tuning trains it
            self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        else:
            encoder.requires_grad_(False)
            self.fc_norm = nn.BatchNorm1d(width, affine=False, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        trunc_normal_(self.head.weight, std=head_init_std) if head_init_std else nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, imgs):
        n = self.encoder.num_prefix_tokens
        tokens = self.encoder.forward_features(imgs)  # the final norm is an Identity when fine-tuning
        return tokens[:, 0] if self.pool == 'cls' and self.mode != 'finetune' else tokens[:, n:].mean(dim=1)

    def forward(self, imgs):
        return self.head(self.fc_norm(self.features(imgs)))


def layer_id(name, num_layers):
    """Layer-wise lr decay (BEiT, MAE §A.3): the embeddings, and for the hybrid every convolution stage, are layer 0;
    block i is layer i + 1; the head and norms are the top layer."""
    if name.startswith(('encoder.cls_token', 'encoder.pos_embed', 'encoder.patch_embed')):
        return 0
    if name.startswith('encoder.blocks.'):
        return int(name.split('.')[2]) + 1
    return num_layers


def param_groups_layer_decay(model, weight_decay, layer_decay):
    num_layers = len(model.encoder.blocks) + 1
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, no_decay = layer_id(name, num_layers), param.ndim < 2 or name.endswith(('token', 'pos_embed'))
        group = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                         lr_scale=layer_decay ** (num_layers - layer)))
        group['params'].append(param)
    return list(groups.values())


def export_timm(model, encoder, path):
    """timm's VisionTransformer names: fine-tuned, the global_pool='avg' layout (fc_norm + head); else the encoder
    (a ViT: evaluate_encoder refuses other encoders before any work). A path ending in .safetensors gets that format
    (timm and the Hugging Face hub load it natively, and it holds no pickle); any other, torch.save's."""
    state = {k.removeprefix('encoder.'): v for k, v in model.state_dict().items()} if model else encoder.state_dict()
    checkpoints.save_checkpoint(state, Path(path))
    print(f'wrote the {"fine-tuned classifier" if model else "encoder"} in timm\'s VisionTransformer layout to {path}')


# -----------------------------------------------------------------------------------------------------------------
# Set-up and resume

@dataclass
class Run(runtime.Run):
    """What one evaluation holds between its phases: the encoder and its data (evaluate_encoder), then for training
    modes the loaders, loss and optimizer and the position being resumed (set_up_training)."""
    # the encoder, the classifier around it, and the data (evaluate_encoder, build_data)
    encoder: nn.Module = None
    raw_model: nn.Module = None
    model: nn.Module = None  # raw_model, in DDP when there are several processes
    train_set: object = None
    val_set: object = None
    num_classes: int = 0
    # training (set_up_training)
    sampler: object = None
    loader: object = None
    val_loader: object = None
    mixup: object = None
    criterion: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    eff_batch: int = 0
    peak_lr: float = 0.0
    steps_per_epoch: int = 0
    warmup_steps: int = 0
    identity: dict = None  # what a checkpoint must match to be continued (run_identity)
    best_acc1: float = 0.0  # so far


def build_data(run):
    """The training set (augmented per mode: MAE's fine-tuning recipe, or crops and flips for the linear probe), the
    validation set, which must hold the same classes, and the number of classes."""
    args = run.args
    mean_std = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation='bicubic')
    eval_tf = create_transform(args.img_size, is_training=False, crop_pct=args.crop_pct, **mean_std)
    if args.mode == 'finetune':
        train_tf = create_transform(args.img_size, is_training=True, auto_augment=args.aa, color_jitter=None,
                                    re_prob=args.reprob, re_mode='pixel', re_count=1, **mean_std)
    elif args.mode == 'linprobe':  # random crops and flips only, as MAE's linear probe
        train_tf = create_transform(args.img_size, is_training=True, color_jitter=None, **mean_std)
    else:
        train_tf = eval_tf
    # frozen features leave an unreadable training image out of the k-NN bank; training replaces it by another
    frozen_features = data.EvaluationImageFolder if args.mode in ('knn', 'frozen') else None
    run.train_set = data.build_dataset(args, 'train', train_tf, frozen_features)
    run.val_set = data.build_dataset(args, 'val', eval_tf)
    if run.val_set is None:
        runtime.fail(f'--data {args.data}: no val/ folder to evaluate on')
    data.refuse_shared_images(run.train_set, run.val_set)
    classes, val_classes = run.train_set.classes, run.val_set.classes
    if val_classes != classes:
        missing, extra = sorted(set(classes) - set(val_classes))[:3], sorted(set(val_classes) - set(classes))[:3]
        official = ' (Tiny-ImageNet\'s official val/images layout: sort val/images into class folders as in train/, ' \
                   'with val_annotations.txt)' if 'images' in extra else ''
        runtime.fail(f'--data {args.data}: val/ and train/ hold different classes (in train/ only: {missing}; in '
                     f'val/ only: {extra}){official}')
    run.num_classes = args.nb_classes or len(classes)
    if run.num_classes < len(classes):
        runtime.fail(f'--nb_classes {run.num_classes}: the data has {len(classes)} classes')


def set_up_training(run):
    """Loaders, mixup, loss and optimizer for fine-tuning or the linear probe, then the checkpoint being resumed."""
    args, device = run.args, run.device
    run.sampler = data.ResumableSampler(run.train_set, num_replicas=run.world_size, rank=run.rank, shuffle=True,
                                         seed=args.seed)
    # Every image augments from its own seeds (--seed, epoch, index), as in train.py: the draws do not depend on
    # which loader worker decodes it, so --num_workers changes nothing the run computes. Workers start once (not a
    # fork per epoch while the previous epoch's checkpoint is still being written by a thread).
    run.loader = DataLoader(run.train_set, batch_size=args.batch_size, sampler=data.ImageSeeds(run.sampler, args.seed),
                            num_workers=args.num_workers, pin_memory=device.type == 'cuda', drop_last=True,
                            worker_init_fn=runtime.ignore_stop_signals, persistent_workers=args.num_workers > 0)
    run.val_loader = data.evaluation_loader(run.val_set, args.batch_size, args.num_workers, run.rank,
                                            run.world_size, persistent=True)
    if len(run.loader) == 0:
        runtime.fail(f'{len(run.train_set)} images are too few for {run.world_size} process(es) x --batch_size '
                     f'{args.batch_size}')
    run.mixup = None
    if args.mode == 'finetune' and (args.mixup > 0 or args.cutmix > 0):
        run.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                          num_classes=run.num_classes)
    run.criterion = (SoftTargetCrossEntropy() if run.mixup else
                     LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 and args.mode == 'finetune'
                     else nn.CrossEntropyLoss())
    run.eff_batch = args.batch_size * run.world_size
    run.peak_lr = args.lr or args.blr * run.eff_batch / 256
    train.refuse_rising_lr(args, run.peak_lr, run.eff_batch)
    if args.mode == 'finetune':
        run.optimizer = torch.optim.AdamW(param_groups_layer_decay(run.raw_model, args.weight_decay, args.layer_decay),
                                          lr=run.peak_lr, fused=True)
    else:
        run.optimizer = torch.optim.SGD([p for p in run.raw_model.parameters() if p.requires_grad], lr=run.peak_lr,
                                        momentum=0.9, weight_decay=args.weight_decay)
    resume_training(run)
    run.model = run.raw_model
    if run.world_size > 1:
        run.model = DDP(run.raw_model, device_ids=[device.index] if device.type == 'cuda' else None,
                        gradient_as_bucket_view=True)  # no second copy of the gradients
    if run.is_main:
        print(f'{args.mode} {args.method}/{args.model} from {args.checkpoint}: {run.num_classes} classes, '
              f'{len(run.train_set)} training images, effective batch {run.eff_batch}, peak lr {run.peak_lr:.3g}')
    run.steps_per_epoch = len(run.loader)
    checkpoints.announce_world_size(run, run.steps_per_epoch)
    runtime.write_flags(run, effective_batch=run.eff_batch, peak_lr=run.peak_lr, steps_per_epoch=run.steps_per_epoch)
    run.warmup_steps = train.warmup_steps(args.warmup_epochs, args.epochs, run.steps_per_epoch, run.is_main)


def resume_training(run):
    """The checkpoint this run continues, if any: refused in one line when it is another run's, else its weights,
    optimizer, epoch and best top-1 restored, and the log made to say what it covers. A folder whose log holds frozen
    evaluations (--mode knn/frozen) is theirs: resuming would drop their rows."""
    log = run.out / 'log.jsonl'
    if log.exists() and b'"mode": ' in log.read_bytes():
        runtime.fail(f'--output_dir {run.out} holds frozen evaluations (--mode knn/frozen rows in log.jsonl): give '
                     f'--mode {run.args.mode} a folder of its own')
    run.identity = dict(run_identity(run.args), train_files=data.fingerprint(run.train_set),
                        val_files=data.fingerprint(run.val_set))
    checkpoints.read_resumed(run, ('model', 'optimizer', 'epoch', 'step', 'best_acc1'), ON_RESUME, run.identity)
    if run.ckpt:
        run.best_acc1 = run.ckpt['best_acc1']
        checkpoints.restore_training(run, run.raw_model, run.optimizer)


def run_identity(args):
    """What makes a fine-tuning checkpoint this run's: its identity flags (ON_RESUME), the pre-trained file by its
    content."""
    checkpoint = 'none' if args.checkpoint == 'none' else f'sha256:{sha256(args.checkpoint)}'
    return dict(ON_RESUME.identity(args), checkpoint=checkpoint)


# -----------------------------------------------------------------------------------------------------------------
# Flag checks: every flag before any work starts

def refuse_flags_of_other_modes(args):
    """A flag that --mode does not read (mixup in a linear probe, an lr in k-NN) would change nothing: say so."""
    defaults = get_args_parser()
    for flag, modes in MODE_FLAGS.items():
        if args.mode not in modes and getattr(args, flag) != defaults.get_default(flag):
            runtime.fail(f'--{flag}: --mode {args.mode} does not use it (it is for --mode {", ".join(modes)})')


def refuse_export_over_own_files(args):
    """--export_timm writes a new file: never over the checkpoint the run reads or resumes, nor over a file the run
    keeps in --output_dir (its checkpoints, log, features), nor over what is not a regular file."""
    export = Path(args.export_timm).resolve()
    read = [Path(path).resolve() for path in (args.checkpoint, args.resume) if path and path != 'none']
    own = export.parent == Path(args.output_dir).resolve() and runtime.is_run_file(export.name)
    if export in read or own:
        runtime.fail(f'--export_timm {args.export_timm} would replace a file this run reads or keeps (--checkpoint, '
                     f'--resume, or a file of the run in --output_dir {args.output_dir}): give a new path')
    if export.exists() and not export.is_file():
        runtime.fail(f'--export_timm {args.export_timm} exists and is not a file: give the path of a file')


def validate_args(args):
    """Every flag checked before any work starts: a bad one ends the run in one line naming it (each number's range
    is declared at the flag: flags.Range)."""
    refuse_flags_of_other_modes(args)
    for key, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output_dir = args.output_dir or f'./output/{args.mode}'
    try:  # timm asserts on a policy it does not know
        create_transform(32, is_training=True, auto_augment=args.aa)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        runtime.fail(f'--aa {args.aa}: not a policy timm knows ({e}); e.g. rand-m9-mstd0.5')
    flags.check_device(args.device)
    flags.check_data_dir(args, get_args_parser())
    if args.export_timm:  # its folder is made now, so that a bad path fails before training, not after
        folder = Path(args.export_timm).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            runtime.fail(f'--export_timm {args.export_timm}: cannot make its folder {folder} ({e.strerror})')
        if not os.access(folder, os.W_OK):
            runtime.fail(f'--export_timm {args.export_timm}: cannot write into {folder}')
        refuse_export_over_own_files(args)
    if args.checkpoint != 'none' and not Path(args.checkpoint).is_file():
        runtime.fail(f'--checkpoint {args.checkpoint}: no such file (or none, to train from scratch)')


def main(args):
    validate_args(args)
    with checkpoints.one_run(args.output_dir):
        evaluate_encoder(args)


if __name__ == '__main__':
    runtime.script(lambda: main(get_args_parser().parse_args()))
