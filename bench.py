"""
Training-step throughput, peak memory and MFU of each method, on synthetic images already on the device: the cost
of the model alone (teachers included, with random weights: speed does not depend on them). The step is train.py's
own forward_backward plus the optimizer step. With --data FOLDER it also measures the input pipeline alone.

    python bench.py --device cpu --model vit_tiny --img_size 64 --patch_size 8 --batch_size 64 --json
    python bench.py --device cuda --model vit_base --img_size 224 --patch_size 16 --batch_size 128 \
        --decoder_dim 512 --decoder_depth 8 --decoder_heads 16

FLOPs are counted with torch.utils.flop_counter (matmuls, convolutions and attention; elementwise work is left
out, as usual for MFU). MFU is against the bf16 matmul peak measured on the same card in the same run.
Method `hf_vitmae` is HF transformers' ViTMAEForPreTraining in the same configuration, when transformers is
installed (it is not a requirement of this project).
"""

import argparse
import json
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints
import data
import flags
import flops
import runtime
import teachers
import train


class HFViTMAE(nn.Module):
    """The peer: HF transformers' ViTMAE with our configuration, behind our method interface."""

    def __init__(self, args):
        super().__init__()
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
        size = train.mae.VIT_SIZES[args.model]
        config = ViTMAEConfig(
            hidden_size=size['embed_dim'], num_hidden_layers=size['depth'], num_attention_heads=size['num_heads'],
            intermediate_size=4 * size['embed_dim'], image_size=args.img_size, patch_size=args.patch_size,
            decoder_hidden_size=args.decoder_dim, decoder_num_hidden_layers=args.decoder_depth,
            decoder_num_attention_heads=args.decoder_heads, decoder_intermediate_size=4 * args.decoder_dim,
            mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, attn_implementation='sdpa')
        self.model = ViTMAEForPreTraining(config)

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        out = self.model(pixel_values=imgs, noise=noise)
        return out.loss, out.logits, out.mask


def hf_available():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def seconds_per_step(fn, device, warmup, steps):
    """Seconds per call of fn, over `steps` calls after `warmup`, with one synchronize at the end: as the training
    loop runs (it never waits for the device between steps), so that a launch-bound step shows the rate a user
    gets, not one slowed by a host wait per step."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - begin) / steps


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_method(method, args, device, peak_flops, teacher_flag=None):
    # A --teacher given on the command line is MR-MAE's (e.g. ViT files trained here); dBOT and the rest keep their own.
    args.method, args.teacher = method, teacher_flag if method.startswith('mr') else None
    torch.manual_seed(0)
    if method == 'hf_vitmae':
        model, teacher = HFViTMAE(args).to(device), None
    else:
        teacher = train.METHODS[method].build_teacher(args)
        model = train.METHODS[method].from_args(args, teacher).to(device)
        teacher = teacher.to(device) if teacher is not None else None
    flops = train.flops_per_image(model, teacher, args, device)
    optimizer = train.build_optimizer(model, args, 1e-4)
    step_model = torch.compile(model, mode=args.compile) if args.compile else model
    autocast = runtime.autocast_for(args, device)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    def step():
        train.forward_backward(step_model, teacher, imgs, args.mask_ratio, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad(), autocast:
            teacher(imgs)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds = seconds_per_step(step, device, args.warmup_steps, args.steps)
    teacher_seconds = seconds_per_step(teacher_forward, device, 1, args.steps) if teacher is not None else 0
    img_per_s = args.batch_size / seconds
    profile = dict(profile=step_profile(step, device, args.profile)) if args.profile else {}
    return dict(method=method, model=args.model, img_size=args.img_size, patch_size=args.patch_size,
                device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                step_ms=round(seconds * 1e3, 2), img_per_s=round(img_per_s, 1),
                teacher_ms=round(teacher_seconds * 1e3, 2),
                gflops_per_img=round(flops / 1e9, 3),
                peak_mem_mb=round(torch.cuda.max_memory_allocated(device) / 2 ** 20) if device.type == 'cuda' else None,
                mfu=round(flops * img_per_s / peak_flops, 4) if peak_flops else None, **profile)


def step_profile(step, device, top):
    """One more step under torch's profiler: on a GPU, the kernels that ran and the launches the host made (CUDA
    runtime calls: a CUDA graph runs many kernels per launch); and the `top` operators by the time their own kernels
    took on the GPU (on a CPU: their own host time), to compare two models' steps operator by operator."""
    on_gpu = device.type == 'cuda'
    with profiler(device) as profile:
        step()
        synchronize(device)
    own_us = (lambda op: op.self_device_time_total) if on_gpu else (lambda op: op.self_cpu_time_total)
    operators = [op for op in profile.key_averages() if op.key.startswith('aten::')]
    events = profile.events()
    return dict(kernels=sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events) if on_gpu else None,
                launches=sum(e.name.startswith('cu') and 'Launch' in e.name for e in events) if on_gpu else None,
                operators=sum(op.count for op in operators),
                top=[dict(name=op.key, calls=op.count, ms=round(own_us(op) / 1e3, 3))
                     for op in sorted(operators, key=own_us, reverse=True)[:top]])


def worker_ms_per_image(dataset, count=1000):
    """What one loader worker spends per image (dataset[i] in this process): read, and for the worker pipeline
    decode and augment, each image with its own seeds as in training."""
    count = min(count, len(dataset))
    begin = time.perf_counter()
    for i in range(count):
        dataset[i, (0, 0, i)]
    return 1e3 * (time.perf_counter() - begin) / count


def bench_loader(args, device):
    """Images per second that the input pipeline delivers with no model, on train.py's own loader
    (data.build_training_images): the worker pipeline (decode + augment in --num_workers processes, uint8,
    normalised on the device), or --decode_on_device (workers read bytes; decoding and augmentation on the device),
    or --gpu_data (decoded once, augmented on the device); and what a worker spends per image. The clock starts once
    the workers' first batches (two each, what they prefetch while nobody asks) are taken, and runs over --steps
    batches, through as many epochs as that takes."""
    images = data.build_training_images(args, rank=0, world_size=1, device=device)
    batches = endless_batches(images)
    for _ in range(1 + 2 * args.num_workers):  # start-up and prefetched batches are not throughput
        next(batches)
    synchronize(device)
    count, begin = 0, time.perf_counter()
    for _, (imgs, _) in zip(range(args.steps), batches):
        count += len(imgs)
    synchronize(device)
    seconds = time.perf_counter() - begin
    pipeline = 'gpu_data' if args.gpu_data else 'decode_on_device' if args.decode_on_device else 'workers'
    device_side = dict(main_process_per_batch=main_process_per_batch(images, device)) if args.decode_on_device else {}
    return dict(method=f'loader:{pipeline}', data=args.data, device=str(device), num_workers=args.num_workers,
                batch_size=args.batch_size, batches=args.steps, img_per_s=round(count / seconds, 1),
                img_per_s_per_core=round(count / seconds / max(1, min(args.num_workers, os.cpu_count())), 1),
                worker_ms_per_image=None if args.gpu_data else round(worker_ms_per_image(images.dataset), 3),
                **device_side)


def main_process_per_batch(images, device):
    """--decode_on_device: what the main process spends on one batch (decode, crop, resize, flip, normalise), image
    by image and batched (device_augment.resized_crops): host ms, the operators it calls from Python (torch's and
    torchvision's decoders: on the CPU torchvision decodes a list of JPEGs in a Python loop, on a GPU in one call),
    the device kernels they launch (on a GPU) and the Python calls it makes."""
    decoded_on_device, raw = images.loader, next(iter(images.loader.loader))
    costs = {}
    for name, batched in (('one_by_one', False), ('batched', True)):
        decoded_on_device.batched = batched
        decoded_on_device.batch(*raw)  # warm-up
        synchronize(device)
        begin = time.perf_counter()
        decoded_on_device.batch(*raw)
        host_ms = 1e3 * (time.perf_counter() - begin)
        synchronize(device)
        calls = []
        sys.setprofile(lambda frame, event, arg: calls.append(event) if event in ('call', 'c_call') else None)
        try:
            decoded_on_device.batch(*raw)
        finally:
            sys.setprofile(None)
        with profiler(device) as profile:
            decoded_on_device.batch(*raw)
            synchronize(device)
        events = profile.events()
        costs[name] = dict(host_ms=round(host_ms, 2), python_calls=len(calls),
                           ops=sum('::' in e.name and not is_within_op(e) for e in events),
                           kernels=sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
                           if device.type == 'cuda' else None)
    decoded_on_device.batched = device.type != 'cpu'
    return dict(images=len(raw[1]), **costs)


def profiler(device):
    """torch's profiler, recording the device's kernels on a GPU. On a CPU, kineto's C++ logger is silenced unless
    KINETO_LOG_LEVEL says otherwise: it prints start and stop markers there, and on CUDA builds a failed GPU count."""
    if device.type == 'cuda':
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')  # read when a profile starts
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def is_within_op(event):  # an operator (aten::, or torchvision's image::) called by another, not from Python
    parent = event.cpu_parent
    while parent is not None:
        if '::' in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def endless_batches(images):
    """The loader's batches, epoch after epoch (a small folder has fewer batches than a benchmark wants)."""
    for epoch in itertools.count():
        images.start_epoch(epoch, 0)
        yield from images.loader


# bench.py --suite gpu: the table docs/performance.md shows, in one call. Each row: its name, its methods ('loader':
# the input pipeline, with --data) and the flags it sets over the command line's. Sized to take about 7 minutes on
# one H100/H200 (an estimate until a GPU runs it: compiling is most of it).
VIT_B = dict(model='vit_base', img_size=224, patch_size=16, decoder_dim=512, decoder_depth=8, decoder_heads=16,
             batch_size=128)
SMALL_RECIPE = dict(model='vit_tiny', img_size=64, patch_size=8, decoder_dim=128, decoder_depth=4, decoder_heads=4,
                    batch_size=256)
SUITES = {'gpu': [
    ('ViT-B/16, eager', 'mae,hf_vitmae,mrmae,mcmae,mrmcmae,dbot', VIT_B),
    ('ViT-B/16, compiled', 'mae,hf_vitmae,dbot', dict(VIT_B, compile='default')),
    ('ViT-B/16, compiled, batch 256', 'mae', dict(VIT_B, compile='default', batch_size=256)),
    ('small recipe (ViT-Tiny/8, 64 px), eager', 'mae,dbot', SMALL_RECIPE),
    ('small recipe (ViT-Tiny/8, 64 px), compiled', 'mae,dbot', dict(SMALL_RECIPE, compile='default')),
    ('small recipe (ViT-Tiny/8, 64 px), CUDA graphs', 'mae,dbot', dict(SMALL_RECIPE, compile='reduce-overhead')),
    ('loader, workers', 'loader', dict(img_size=224, batch_size=256, num_workers=8)),
    ('loader, --decode_on_device', 'loader', dict(img_size=224, batch_size=256, num_workers=8, decode_on_device=True)),
]}
SUITE_FLAGS_FREE = {'device', 'data', 'precision'}  # what a suite takes from the command line


# The train.py flags a benchmark uses: the model, the method's teachers, the optimizer, the device and the loader.
# The others (schedule, output, resume, ...) are hidden from --help and refused when given.
TRAIN_FLAGS_USED = {
    'model', 'img_size', 'patch_size', 'decoder_dim', 'decoder_depth', 'decoder_heads', 'mask_ratio', 'norm_pix_loss',
    'drop_path', 'teacher', 'clip_model', 'clip_weights', 'clip_quick_gelu', 'dino_model', 'dino_weights',
    'mimic_weight', 'focused_mimic', 'fusion_layers', 'teacher_depth', 'weight_decay', 'betas', 'opt_eps',
    'batch_size', 'device', 'precision', 'compile', 'data', 'data_dir', 'num_workers', 'gpu_data', 'decode_on_device'}


def bench_checkpoint_stall(args, device, method, repeats=3):
    """How long an epoch-end checkpoint holds up training: the method's weights and AdamW's state after one step, and
    what it keeps of its teacher. Before: written by save_checkpoint as train.py did (the caller waits for the write
    and its fsync), with a teacher's weights inside (dBOT). Now: submitted to checkpoints.BackgroundWriter (the caller
    waits for the copy to host memory only), naming the stage's teacher file instead (checkpoints.keep_teacher: that
    file is written once per stage, not timed here). The best of `repeats` each; the background writes are waited
    for between repeats, untimed."""
    teacher = train.METHODS[method].build_teacher(args)
    model = train.METHODS[method].from_args(args, teacher).to(device)
    teacher = teacher.to(device) if teacher is not None else None
    optimizer = train.build_optimizer(model, args, 1e-4)
    imgs = torch.randn(2, 3, args.img_size, args.img_size, device=device)
    train.forward_backward(model, teacher, imgs, args.mask_ratio, runtime.autocast_for(args, device))
    optimizer.step()
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), args=vars(args))
    before = dict(state, teacher=model.teacher_state(teacher))
    now = dict(state, teacher=dict(teacher_file='teacher-stage0.pth', written='')
               if checkpoints.holds_weights(before['teacher']) else before['teacher'])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'checkpoint-last.pth'

        def write(snapshot):
            checkpoints.save_checkpoint(snapshot, path)

        def timed(save):
            synchronize(device)
            start = time.perf_counter()
            save()
            seconds = time.perf_counter() - start
            checkpoints.writer.wait()
            return seconds, round(path.stat().st_size / 2 ** 20)

        synchronous, before_mb = min(timed(lambda: write(before)) for _ in range(repeats))
        background, now_mb = min(timed(lambda: checkpoints.writer.submit(write, now)) for _ in range(repeats))
    return dict(measure='checkpoint_stall', method=method, model=args.model, device=str(device),
                checkpoint_mb_before=before_mb, synchronous_s=round(synchronous, 3), checkpoint_mb_now=now_mb,
                background_s=round(background, 3))


def get_args_parser():
    parser = train.get_args_parser()
    parser.prog = 'bench.py'
    parser.description = 'Benchmark of one training step per method, and of the input pipeline (model flags as in ' \
                         'train.py)'
    for action in parser._actions:  # argparse has no public way to hide a parent's flag
        if action.dest not in TRAIN_FLAGS_USED | {'help'}:
            action.help = argparse.SUPPRESS
    parser.add_argument('--methods', type=flags.text, default=None,
                        help=f'comma-separated, of {", ".join(sorted(train.METHODS) + ["hf_vitmae"])} (default: all; '
                             f'hf_vitmae needs transformers, which this project does not require)')
    parser.add_argument('--steps', default=10, type=flags.COUNT,
                        help='timed steps (or loader batches), after the warm-up, with one synchronize at the end')
    parser.add_argument('--warmup_steps', default=3, type=flags.AMOUNT)
    parser.add_argument('--json', action='store_true', help='one JSON object per line')
    parser.add_argument('--profile', default=0, type=flags.AMOUNT, metavar='N',
                        help="after the timed steps, profile one more: its kernels and launches (GPU), its "
                             "operators, and the N that took the most time (GPU kernels' time; on a CPU, host time)")
    parser.add_argument('--data_only', action='store_true', help='with --data: measure the input pipeline alone')
    parser.add_argument('--checkpoint_stall', action='store_true',
                        help='instead of the steps: how long an epoch-end checkpoint of the model holds up training, '
                             'written synchronously with its teacher inside (before) and in the background naming its '
                             'teacher file (now); for --methods (default: mae)')
    parser.add_argument('--suite', default=None, choices=sorted(SUITES),
                        help='gpu: the whole GPU table of docs/performance.md in one call (every method at ViT-B/16 '
                             'eager, MAE, HF ViTMAE and dBOT compiled, the small recipe, and with --data both loaders)')
    parser.set_defaults(data=None, batch_size=64)
    return parser


def check_args(args, parser):
    """bench.py's own flags, and no train.py flag that a benchmark would ignore; -> the methods to run."""
    train_flags = vars(train.get_args_parser().parse_args([]))
    for flag in sorted(set(train_flags) - TRAIN_FLAGS_USED):
        if getattr(args, flag) != parser.get_default(flag):
            runtime.fail(f'--{flag}: bench.py does not use it (it times single steps on fixed images)')
    if args.data_only and args.data is None:
        runtime.fail('--data_only measures the input pipeline of --data FOLDER: give --data')
    if args.data_only and args.profile:
        runtime.fail('--profile profiles a training step, and --data_only times none: drop one of them')
    if args.suite:
        chosen = [flag for flag in sorted(TRAIN_FLAGS_USED - SUITE_FLAGS_FREE) if getattr(args, flag) !=
                  parser.get_default(flag)] + ['methods'] * (args.methods is not None) + ['data_only'] * args.data_only
        if chosen:
            runtime.fail(f'--{chosen[0]}: --suite {args.suite} sets the methods and the model, loader and compile '
                         f'flags of every row itself (give --device, --data, --precision, --steps, --warmup_steps)')
        if not args.device.startswith('cuda'):
            runtime.fail(f'--suite {args.suite} measures a GPU: give --device cuda (on a machine that has one)')
    known = sorted(train.METHODS) + ['hf_vitmae']
    methods = [] if args.data_only else args.methods.split(',') if args.methods else known
    for method in methods:
        if method not in known:
            runtime.fail(f'--methods: {method!r} is not a method (choose from {", ".join(known)})')
    return methods


def main():
    parser = get_args_parser()
    args = parser.parse_args()
    methods = check_args(args, parser)
    train.validate_args(args)
    device = torch.device(args.device)
    if args.checkpoint_stall:
        with runtime.stop_on_signals():
            for method in methods if args.methods else ['mae']:
                print(json.dumps(bench_checkpoint_stall(args, device, method)))
        return
    rows = SUITES[args.suite] if args.suite else [(None, ','.join(methods + ['loader'] * bool(args.data)), {})]
    # a signal ends the benchmark at once, in one line (runtime.on_signal); the stand-ins go whatever happens
    with runtime.stop_on_signals(), tempfile.TemporaryDirectory() as standins:
        peak_flops = flops.measured_peak_flops(device) if device.type == 'cuda' else None
        if not args.json and peak_flops:
            print(f'bf16 peak {peak_flops / 1e12:.0f} TFLOP/s measured on {torch.cuda.get_device_name(device)}')
        for name, row_methods, overrides in rows:
            row_args = argparse.Namespace(**dict(vars(args), **overrides))
            results = measure(row_args, row_methods.split(','), device, peak_flops, standins)
            report(results, row_args, name)


def measure(args, methods, device, peak_flops, standins):
    """One row of a suite, or the command line's: each method's step, then ('loader' among methods, with --data) the
    input pipeline. -> the result dicts."""
    if args.data is None and 'loader' in methods:
        print('skipping the loader: give --data FOLDER to measure it', file=sys.stderr)
    if 'hf_vitmae' in methods and not hf_available():
        print('skipping hf_vitmae: transformers is not installed (pip install transformers to compare with it)',
              file=sys.stderr)
        methods = [m for m in methods if m != 'hf_vitmae']
    if any(m.startswith('mr') for m in methods) and args.clip_weights is None and args.dino_weights is None:
        # MR-MAE's teachers, randomly initialised: speed does not depend on the weights
        args.clip_weights, args.dino_weights = teachers.save_standin_weights(standins, args.clip_model,
                                                                          args.dino_model)
    teacher_flag = args.teacher  # bench_method sets args.teacher per method
    return ([bench_method(m, args, device, peak_flops, teacher_flag) for m in methods if m != 'loader'] +
            ([bench_loader(args, device)] if 'loader' in methods and args.data else []))


def report(results, args, name=None):
    """Each result as a JSON line (--json), else as the rows of a table under a heading naming the configuration;
    printed as each row of a suite ends, so that a run cut short keeps what it measured."""
    if args.json:
        for result in results:
            print(json.dumps(dict(result, suite_row=name) if name else result), flush=True)
        return
    columns = ['method', 'device', 'batch_size', 'step_ms', 'teacher_ms', 'img_per_s', 'gflops_per_img',
               'peak_mem_mb', 'mfu']
    compiled = f', compiled ({args.compile})' if args.compile else ''
    print(f'\n{name + ": " if name else ""}{args.model} at {args.img_size} px, patch {args.patch_size}, decoder '
          f'{args.decoder_dim}x{args.decoder_depth}, {args.precision}{compiled}')
    print(' | '.join(columns))
    for result in results:
        print(' | '.join(str(result.get(c, '')) for c in columns), flush=True)
        if 'profile' in result:
            profile = result['profile']
            kernels = (f', {profile["kernels"]} kernels, {profile["launches"]} launches'
                       if profile['kernels'] is not None else '')
            print(f'  one step: {profile["operators"]} operators{kernels}; the most '
                  f'{"GPU" if kernels else "host"} time:', flush=True)
            for op in profile['top']:
                print(f'    {op["name"]}: {op["ms"]} ms, {op["calls"]} calls', flush=True)
        if 'main_process_per_batch' in result:
            costs = result['main_process_per_batch']
            print(f'  main process per batch of {costs["images"]}: ' + '; '.join(
                f'{name.replace("_", " ")}: {costs[name]["host_ms"]} ms, {costs[name]["ops"]} operators, '
                f'{costs[name]["kernels"]} kernels, {costs[name]["python_calls"]} Python calls'
                for name in ('one_by_one', 'batched')), flush=True)


if __name__ == '__main__':
    runtime.script(main)
