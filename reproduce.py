"""
The papers' claims at small scale: every method pre-trained on the same data with the same budget, every encoder (and a
from-scratch baseline) evaluated with the same fine-tuning, linear probe and k-NN; then a table and two figures.

    python reproduce.py --data /path/to/tiny-imagenet-200 --output_dir results        # the protocol (GPU)
    python reproduce.py --data FOLDER --output_dir /tmp/smoke --smoke                   # minutes on a CPU

MR-MAE and MR-MCMAE mimic the MAE and dBOT encoders pre-trained here (no CLIP or DINO weights are needed); their rows'
total compute includes those teachers' pre-training. Every run is one train.py / finetune.py invocation, executed
in-process with the exact arguments written to commands.txt, so each can be repeated on its own.
Outputs in --output_dir: results.md (the table), finetune_top1.png, pretrain_loss.png, commands.txt and every run's
own directory (checkpoints, log.jsonl).
"""

import argparse
import json
import shlex
import time
from pathlib import Path

from PIL import Image, ImageDraw

import finetune
import train

PRETRAIN = ['mae', 'dbot', 'mcmae', 'mrmae', 'mrmcmae']  # in dependency order: MR-* mimic MAE and dBOT
TEACHERS = {'mae': 'pixels', 'dbot': 'bootstrapped (random start)', 'mcmae': 'pixels',
            'mrmae': 'MAE + dBOT encoders (ours)', 'mrmcmae': 'MAE + dBOT encoders (ours)', 'scratch': '-'}


def get_args_parser():
    parser = argparse.ArgumentParser('Small-scale reproduction of the papers\' claims')
    parser.add_argument('--data', required=True, help='an ImageFolder root with train/ and val/ (Tiny-ImageNet)')
    parser.add_argument('--output_dir', default='results')
    parser.add_argument('--model', default='vit_tiny')
    parser.add_argument('--img_size', default=64, type=int)
    parser.add_argument('--patch_size', default=8, type=int)
    parser.add_argument('--pretrain_epochs', default=100, type=int, help='per method; dBOT splits it into 2 stages')
    parser.add_argument('--finetune_epochs', default=50, type=int)
    parser.add_argument('--linprobe_epochs', default=30, type=int)
    parser.add_argument('--batch_size', default=256, type=int)
    parser.add_argument('--num_workers', default=8, type=int)
    parser.add_argument('--gpu_data', action='store_true', help='pass --gpu_data to pre-training')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--smoke', action='store_true',
                        help='a minuscule run of the whole protocol (1-2 epochs, tiny batches) to check it end to end')
    return parser


def run(script, argv, log):
    """One train.py / finetune.py run, in this process; returns its wall-clock seconds over every sitting that
    trained it, kept in OUTPUT_DIR/wall_clock.json (a rerun that finds the run finished adds nothing)."""
    log.write(f'python {script.__name__}.py {shlex.join(argv)}\n')
    log.flush()
    out = Path(argv[argv.index('--output_dir') + 1])
    logged = lambda: (out / 'log.jsonl').read_text() if (out / 'log.jsonl').exists() else ''
    before, start = logged(), time.perf_counter()
    script.main(script.get_args_parser().parse_args(argv))
    record = out / 'wall_clock.json'
    seconds = json.loads(record.read_text())['seconds'] if record.exists() else 0.0
    if logged() != before:  # it trained (or evaluated): its time counts
        seconds += time.perf_counter() - start
        record.write_text(json.dumps(dict(seconds=seconds)))
    return seconds


def last_row(path):
    return json.loads(path.read_text().splitlines()[-1])


def bar_chart(values, path, title):
    """Horizontal bars, one per method, labelled with their values."""
    width, bar, left = 640, 28, 150
    image = Image.new('RGB', (width, 40 + bar * len(values) + 10), 'white')
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill='black')
    top = max(values.values()) or 1.0
    for i, (name, value) in enumerate(values.items()):
        y = 40 + i * bar
        draw.text((10, y + 8), name, fill='black')
        draw.rectangle([left, y + 4, left + (width - left - 70) * value / top, y + bar - 4], fill=(70, 110, 180))
        draw.text((left + (width - left - 70) * value / top + 6, y + 8), f'{value:.1f}', fill='black')
    image.save(path)


def line_chart(curves, path, title):
    """One line per method: loss against epoch, each normalised by its own first value (the losses of different
    methods have different units), with a legend."""
    width, height, margin = 640, 400, 50
    colours = [(70, 110, 180), (200, 80, 60), (60, 160, 90), (150, 90, 170), (220, 150, 40)]
    image = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill='black')
    draw.rectangle([margin, margin, width - margin, height - margin], outline='black')
    longest = max(len(c) for c in curves.values())
    for i, (name, losses) in enumerate(curves.items()):
        points = [(margin + (width - 2 * margin) * e / max(1, longest - 1),
                   height - margin - (height - 2 * margin) * min(1.0, loss / losses[0]))
                  for e, loss in enumerate(losses)]
        draw.line(points if len(points) > 1 else points * 2, fill=colours[i % len(colours)], width=2)
        draw.text((width - margin - 120, margin + 8 + 14 * i), name, fill=colours[i % len(colours)])
    draw.text((margin, height - margin + 8), f'epoch 0 .. {longest - 1}; loss / first epoch\'s loss (0 .. 1)',
              fill='black')
    image.save(path)


def main(args):
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    small = args.smoke
    common = ['--data', args.data, '--model', args.model, '--img_size', str(args.img_size), '--patch_size',
              str(args.patch_size), '--batch_size', str(4 if small else args.batch_size), '--num_workers',
              str(0 if small else args.num_workers), '--seed', str(args.seed)]
    pre_epochs = 2 if small else args.pretrain_epochs  # 2: dBOT's two stages need one epoch each
    pretrain = common + ['--epochs', str(pre_epochs), '--warmup_epochs', '1' if small else '10',
                         '--vis_every', '1000'] + (['--decoder_dim', '32', '--decoder_depth', '1'] if small else [])
    if args.gpu_data:
        pretrain.append('--gpu_data')
    seconds, log = {}, open(out / 'commands.txt', 'w')
    teachers = f'{out / "mae" / "checkpoint-last.pth"}+{out / "dbot" / "checkpoint-last.pth"}'
    for method in PRETRAIN:
        extra = ['--teacher', teachers] if method.startswith('mr') else []
        seconds[method] = run(train, pretrain + ['--method', method, '--output_dir', str(out / method), *extra], log)
    seconds['scratch'] = 0.0

    finetune_flags = ['--epochs', str(1 if small else args.finetune_epochs), '--warmup_epochs', '0' if small else '5',
                      '--blr', '5e-4', '--layer_decay', '0.75', '--drop_path', '0.1', '--crop_pct', '1.0']
    linprobe_flags = ['--epochs', str(1 if small else args.linprobe_epochs), '--warmup_epochs', '0' if small else '3',
                      '--crop_pct', '1.0']
    rows = []
    for name in PRETRAIN + ['scratch']:
        checkpoint = 'none' if name == 'scratch' else str(out / name / 'checkpoint-last.pth')
        source = ['--checkpoint', checkpoint] + (['--method', 'mae'] if name == 'scratch' else [])
        results = {}
        for mode, flags in (('finetune', finetune_flags), ('linprobe', linprobe_flags), ('knn', ['--crop_pct', '1.0'])):
            if name == 'scratch' and mode != 'finetune':
                continue  # a random encoder's frozen features are not a claim of anybody's
            eval_dir = out / f'{name}-{mode}'
            run(finetune, common + source + ['--mode', mode, '--output_dir', str(eval_dir), *flags], log)
            results[mode] = last_row(eval_dir / 'log.jsonl')['val_acc1'] if mode == 'knn' else max(
                json.loads(line)['val_acc1'] for line in (eval_dir / 'log.jsonl').read_text().splitlines())
        teacher_cost = seconds['mae'] + seconds['dbot'] if name.startswith('mr') else 0.0
        rows.append(dict(method=name, teacher=TEACHERS[name], pretrain_epochs=0 if name == 'scratch' else pre_epochs,
                         pretrain_minutes=(seconds[name] + teacher_cost) / 60, **results))
    log.close()

    lines = ['| method | teacher | pre-train epochs | pre-train wall-clock (min, teachers included) | '
             'fine-tune top-1 | linear probe top-1 | k-NN top-1 |', '|---|---|---|---|---|---|---|']
    for r in rows:
        frozen = ' | '.join(f'{r[mode]:.1f}' if mode in r else '-' for mode in ('linprobe', 'knn'))
        lines.append(f'| {r["method"]} | {r["teacher"]} | {r["pretrain_epochs"]} | {r["pretrain_minutes"]:.1f} | '
                     f'{r["finetune"]:.1f} | {frozen} |')
    table = '\n'.join(lines) + '\n'
    (out / 'results.md').write_text(table)
    bar_chart({r['method']: r['finetune'] for r in rows}, out / 'finetune_top1.png', 'fine-tune top-1 (%)')
    curves = {m: [json.loads(line)['loss'] for line in (out / m / 'log.jsonl').read_text().splitlines()]
              for m in PRETRAIN}
    line_chart(curves, out / 'pretrain_loss.png', 'pre-training loss')
    print(table)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
