"""
The papers' claims at small scale: every method pre-trained on the same data with the same budget, every encoder
(plus a random-init encoder and a from-scratch classifier) evaluated by k-NN, a linear classifier on cached frozen
features, and fine-tuning with one short fixed budget; then a table, per-run JSON records and figures.

    python reproduce.py --data /tmp/data/tiny-imagenet-200 --budget cpu     # Tiny-ImageNet-50, 2 CPU cores, ~4 h
    python reproduce.py --data /path/to/tiny-imagenet-200 --budget gpu --max_minutes 8 --output_dir results/gpu
    python reproduce.py --data FOLDER --output_dir /tmp/smoke --budget smoke   # minutes: the protocol end to end

Sittings: a run whose record results/runs/NAME.json exists is finished and skipped; an unfinished one continues
from its checkpoint in --work_dir (train.py and finetune.py resume). A signal stops the sitting after the current
run has checkpointed. MR-MAE and MR-MCMAE mimic the MAE and dBOT encoders pre-trained here (no CLIP or DINO weights
exist on these machines), read from encoder-only fp16 files in results/encoders/, so a sitting on a fresh machine
can continue; their rows' compute includes those teachers' pre-training. Every run is one train.py / finetune.py
invocation, executed in this process with the exact arguments written to commands.txt, so any run can be repeated
on its own.
"""

import hashlib
import json
import os
import shlex
import threading
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import torch

import checkpoints
import finetune
import flags
import mae
import runtime
import train

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Per budget: pre-training epochs E for every method (dBOT's two stages share them), warm-up epochs per stage, the
# one fine-tuning budget and the encoders it is spent on, batch size and loader. The CPU budget is the smallest that
# the protocol allows (dBOT needs two stages of at least one epoch), sized from bench.py on the 2-core machine
# (README, Results); it runs for about five hours there.
BUDGETS = {
    'cpu': dict(pretrain_epochs=2, warmup_epochs=0, finetune_epochs=1, finetune_warmup_epochs=0, batch_size=128,
                num_workers=2, gpu_data=True, fine_tune=('random-init', 'mae', 'dbot'), model_flags=[],
                curve=(8, (2, 4, 8))),
    # Sized to end inside one 8-minute command on one H100/H200 (--max_minutes 8 stops it cleanly if not): MAE at
    # ViT-Tiny/8, 64 px, batch 256 with --gpu_data ran at about 10,800 img/s on an H200 (issue 25), about 2.5 s per
    # epoch of Tiny-ImageNet-50, and all rows together cost about 12 MAE epochs per epoch (bench.py's CPU FLOPs).
    # Not yet measured on a GPU with this budget: the first GPU session runs bench.py and resizes it.
    'gpu': dict(pretrain_epochs=8, warmup_epochs=1, finetune_epochs=2, finetune_warmup_epochs=0, batch_size=256,
                num_workers=8, gpu_data=True, fine_tune=('random-init', 'mae', 'dbot'), model_flags=[], curve=None),
    'smoke': dict(pretrain_epochs=2, warmup_epochs=1, finetune_epochs=1, finetune_warmup_epochs=0, batch_size=4,
                  num_workers=0, gpu_data=False, fine_tune=('random-init', 'mae'),
                  model_flags=['--decoder_dim', '32', '--decoder_depth', '1'], curve=(2, (1, 2))),
}
TEACHER_ROWS = ('mae', 'dbot')  # MR-MAE and MR-MCMAE mimic these encoders
TEACHER_ROWS_AND_BASELINE = ('random-init',) + TEACHER_ROWS  # fine-tuned first, at every budget
# The table's rows and what each encoder learned to predict
TARGETS = {'random-init': '- (no pre-training)', 'mae': 'pixels', 'dbot-stage1': 'a random teacher\'s features',
           'dbot': 'bootstrapped features (2 stages)', 'mcmae': 'pixels', 'mrmae': 'pixels + MAE and dBOT features',
           'mrmcmae': 'pixels + MAE and dBOT features'}


def get_args_parser():
    parser = flags.ArgumentParser('Small-scale reproduction of the papers\' claims')
    parser.add_argument('--data', type=flags.text, required=True,
                        help='an ImageFolder root with train/ and val/ (Tiny-ImageNet)')
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--curve', action='store_true',
                        help='instead of the table: MAE and dBOT pre-trained for a longer schedule, each encoder '
                             'evaluated frozen at points along it (the learning curve; OUTPUT_DIR/curve/)')
    parser.add_argument('--output_dir', type=flags.text, default=None,
                        help='the table, records, figures, teacher encoders (default: output/reproduce-BUDGET/results; '
                             'the committed records are in results/, give --output_dir results to continue them)')
    parser.add_argument('--work_dir', type=flags.text, default=None, help='checkpoints and logs of every run (default: '
                                                         'output/reproduce-BUDGET; not for git)')
    parser.add_argument('--model', default='vit_tiny', choices=sorted(mae.VIT_SIZES))
    parser.add_argument('--img_size', default=64, type=flags.COUNT)
    parser.add_argument('--patch_size', default=8, type=flags.COUNT)
    parser.add_argument('--seed', default=0, type=flags.SEED)
    parser.add_argument('--max_minutes', default=None, type=flags.Range(float, 0, 1e6, open_low=True),
                        help='stop cleanly after this many minutes (the run in progress checkpoints), report what '
                             'finished; the same command continues')
    return parser


@dataclass
class Invocation:
    """One train.py or finetune.py invocation, its record's name, and what its record keeps."""
    name: str
    script: object
    argv: list
    summarise: object  # (output folder) -> the record's numbers
    after: list = field(default_factory=list)  # callables run once it has finished, before its record is written

    @property
    def out(self):
        return Path(self.argv[self.argv.index('--output_dir') + 1])

    def command(self):
        return f'python {self.script.__name__}.py {shlex.join(self.argv)}'


def log_rows(out):
    path = out / 'log.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def machine():
    model = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                  if line.startswith('model name')), 'unknown CPU') if Path('/proc/cpuinfo').exists() else 'unknown'
    gpu = f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return f'{model}, {os.cpu_count()} cores{gpu}'


# -----------------------------------------------------------------------------------------------------------------
# What each finished run keeps in its record

def pretrain_summary(epochs):
    def summarise(out):
        rows = log_rows(out)
        if len(rows) < epochs:
            return None
        return dict(epochs=epochs, final_loss=rows[-1]['loss'], img_per_s=round(sum(r['img_per_s'] for r in rows)
                                                                               / len(rows), 1),
                    gflops_per_img=rows[-1]['gflops_per_img'])
    return summarise


def finetune_summary(epochs):
    def summarise(out):
        rows = [row for row in log_rows(out) if 'val_acc1' in row]
        if len(rows) < epochs:
            return None
        return dict(epochs=epochs, top1=rows[-1]['val_acc1'], top5=rows[-1]['val_acc5'], best_top1=max(
            r['val_acc1'] for r in rows), img_per_s=round(sum(r['img_per_s'] for r in rows) / len(rows), 1))
    return summarise


def frozen_summary(out):
    rows = [row for row in log_rows(out) if row.get('mode') == 'frozen']
    if not rows:
        return None
    keys = ('k', 'knn_acc1', 'knn_acc5', 'linear_epochs', 'linear_acc1', 'linear_acc5')
    return {key: rows[-1][key] for key in keys}


def data_fingerprint(root):
    """What makes two data folders the same data set wherever they lie: class and image counts, and a digest of every
    image file's path (relative to the root) and size."""
    root = Path(root)
    try:
        files = sorted(str(path.relative_to(root)) + f':{path.stat().st_size}' for split in ('train', 'val')
                       for path in (root / split).rglob('*') if path.is_file())
    except OSError as e:  # a folder or file this user may not read
        runtime.fail(f'--data {root}: cannot read {e.filename} ({e.strerror})')
    count = lambda split: sum(line.startswith(split + '/') for line in files)  # noqa: E731
    return dict(classes=sum(path.is_dir() for path in (root / 'train').iterdir()), train_images=count('train'),
                val_images=count('val'), files_sha256=hashlib.sha256('\n'.join(files).encode()).hexdigest()[:16])


def check_records_are_of(data, *folders):
    """A records folder holds one data set's runs: a record of another (or of none named) would be skipped as
    finished and printed as this data's row."""
    for folder in folders:
        for path in sorted(folder.glob('*.json')):
            theirs = json.loads(path.read_text()).get('data')
            if theirs != data:
                runtime.fail(f'{path} is a record of another data set ({theirs or "none named"}) than --data '
                           f'({data}): give another --output_dir, or the data set those records were made from')


def comparable(command):
    """A run's command without where its files lie (--output_dir, --checkpoint, both under --work_dir; --data, whose
    content check_records_are_of compares): what makes two records the same run."""
    words = shlex.split(command)
    return [word if previous not in ('--output_dir', '--checkpoint', '--data') else '...'
            for previous, word in zip([''] + words, words)]


def execute(run, records, data):
    """The run (resuming it where a sitting left it), then its record: the numbers, the command, the wall-clock over
    every sitting that worked on it, the threads and the machine. -> False when a signal stopped it."""
    record = records / f'{run.name}.json'
    if record.exists():
        made_by = json.loads(record.read_text()).get('command', '')
        if comparable(made_by) != comparable(run.command()):
            runtime.fail(f'{record} was made by another command ({made_by}) than this sitting\'s '
                         f'({run.command()}): give another --output_dir, or the flags that made it')
        return True
    clock = run.out / 'wall_clock.json'
    start = time.perf_counter()
    run.script.main(run.script.get_args_parser().parse_args(run.argv))
    seconds = (json.loads(clock.read_text())['seconds'] if clock.exists() else 0.0) + time.perf_counter() - start
    clock.write_text(json.dumps(dict(seconds=seconds)))
    summary = run.summarise(run.out)
    if summary is None:  # stopped before its end: the same command continues it
        return False
    for step in run.after:
        step(run)
    record.write_text(json.dumps(dict(
        run=run.name, command=run.command(), data=data, seconds=round(seconds, 1), **summary,
        omp_num_threads=os.environ.get('OMP_NUM_THREADS'), torch_threads=torch.get_num_threads(),
        machine=machine(), finished=datetime.now(timezone.utc).isoformat(timespec='seconds')), indent=1) + '\n')
    print(f'finished {run.name}: {record}')
    return not runtime.stop_requested  # a stop that came as it ended stops the sitting after it


# -----------------------------------------------------------------------------------------------------------------
# The plan: every run, in dependency order, each row's pre-training followed by its evaluations

def keep_teacher_encoder(results):
    """An encoder-only fp16 copy of a finished pre-training (about 11 MB for ViT-Tiny) for the MR rows to mimic."""
    def keep(run):
        state = checkpoints.load_checkpoint(run.out / 'checkpoint-last.pth')['model']
        encoder = {k: v.half() for k, v in train.mae.encoder_state_dict(state).items()}
        torch.save(encoder, results / 'encoders' / f'{run.name}-encoder-fp16.pth')
    return keep


def keep_stage1_encoder(run):
    """dBOT's last teacher is its stage-1 student (dBOT §3): written out so that stage 1 is evaluated too."""
    torch.save(checkpoints.load_checkpoint(run.out / 'teacher-stage1.pth')['model'], run.out / 'stage1-encoder.pth')


def keep_log_and_figure(results):
    def keep(run):
        shutil.copy(run.out / 'log.jsonl', results / 'logs' / f'{run.name}.jsonl')
        if (run.out / 'steps.jsonl').exists():  # runs of train.py before steps.jsonl have epoch means only
            (results / 'logs' / 'steps').mkdir(exist_ok=True)
            shutil.copy(run.out / 'steps.jsonl', results / 'logs' / 'steps' / f'{run.name}.jsonl')
        figures = sorted(run.out.glob('vis-epoch*.png'))
        shutil.copy(figures[-1], results / 'figures' / f'{run.name}-last-epoch.png')
    return keep


def data_flags(args, budget):
    return ['--data', args.data, '--img_size', str(args.img_size), '--batch_size', str(budget['batch_size']),
            '--num_workers', str(budget['num_workers'])]


def pretrain_flags(args, budget, epochs):
    return data_flags(args, budget) + [
        '--model', args.model, '--patch_size', str(args.patch_size), '--epochs', str(epochs), '--warmup_epochs',
        str(budget['warmup_epochs']), '--vis_every', str(epochs), *budget['model_flags']] + (
        ['--gpu_data'] if budget['gpu_data'] else [])


def frozen_run(name, args, budget, source, seed, out, summarise=None):
    """k-NN and the linear classifier on the frozen features of the encoder that `source` names."""
    flags = ['--mode', 'frozen', '--crop_pct', '1.0'] + (['--epochs', '2'] if args.budget == 'smoke' else [])
    argv = data_flags(args, budget) + source + flags + ['--seed', str(seed), '--output_dir', str(out)]
    return Invocation(name, finetune, argv, summarise or frozen_summary)


def plan(args, budget, results, work):
    common = data_flags(args, budget)
    epochs = budget['pretrain_epochs']
    pretrain = pretrain_flags(args, budget, epochs)
    teachers = '+'.join(str(results / 'encoders' / f'{name}-encoder-fp16.pth') for name in TEACHER_ROWS)
    finetune_flags = ['--mode', 'finetune', '--epochs', str(budget['finetune_epochs']), '--warmup_epochs',
                      str(budget['finetune_warmup_epochs']), '--blr', '5e-4', '--layer_decay', '0.75',
                      '--crop_pct', '1.0']
    scratch = ['--checkpoint', 'none', '--model', args.model, '--patch_size', str(args.patch_size)]

    def frozen(row, source, seed):
        return frozen_run(f'{row}-frozen', args, budget, source, seed, work / f'{row}-frozen')

    def pretraining(row, method, seed):
        extra = ['--teacher', teachers] if method.startswith('mr') else []
        after = [keep_log_and_figure(results)] + [keep_teacher_encoder(results)] * (row in TEACHER_ROWS)
        after += [keep_stage1_encoder] * (method == 'dbot')
        argv = pretrain + ['--method', method, '--seed', str(seed), *extra, '--output_dir', str(work / row)]
        return Invocation(row, train, argv, pretrain_summary(epochs), after)

    def encoder(row):
        return scratch if row == 'random-init' else ['--checkpoint', str(work / row / 'checkpoint-last.pth')]

    def fine_tuning(row):  # fine-tuning a random encoder is training from scratch
        return Invocation(f'{row}-finetune', finetune, common + encoder(row) + finetune_flags + [
            '--seed', str(args.seed), '--output_dir', str(work / f'{row}-finetune')],
            finetune_summary(budget['finetune_epochs']))

    def rows_of(method):
        runs = [pretraining(method, method, args.seed), frozen(method, encoder(method), args.seed)]
        if method == 'dbot':
            runs.append(frozen('dbot-stage1', ['--checkpoint', str(work / 'dbot' / 'stage1-encoder.pth')], args.seed))
            runs += [fine_tuning(row) for row in TEACHER_ROWS_AND_BASELINE if row in budget['fine_tune']]
        elif method in budget['fine_tune'] and method not in TEACHER_ROWS_AND_BASELINE:
            runs.append(fine_tuning(method))
        return runs

    # MAE and dBOT first: the MR rows mimic them. Then the noise, the cheapest rows again with the next seed (a
    # random encoder; MAE's pre-training and its features): every comparison needs it, so it comes before the
    # slowest rows. Then the convolutional and mimicking methods.
    other = args.seed + 1
    noise = [frozen(f'random-init-seed{other}', scratch, other), pretraining(f'mae-seed{other}', 'mae', other),
             frozen(f'mae-seed{other}', encoder(f'mae-seed{other}'), other)]
    runs = [frozen('random-init', scratch, args.seed), *rows_of('mae'), *rows_of('dbot'), *noise]
    for method in ('mcmae', 'mrmae', 'mrmcmae'):
        runs += rows_of(method)
    return runs


def curve_rows(args, results, epochs):
    """The curve's pre-trainings: (record name, method, seed, extra train.py flags, what the chart calls it). The
    teacher of the students is MAE's encoder at the schedule's end (an fp16 file, as the table's teachers), the only
    encoder here that learned something (no CLIP or DINO weights on these machines). A row needing more stages than
    the schedule has epochs is left out (the smoke budget's two epochs hold no three stages)."""
    teacher = str(results / 'encoders' / f'mae-e{epochs}-encoder-fp16.pth')
    thirds = [epochs // 3 + (i < epochs % 3) for i in range(3)]  # 8 -> 3, 3, 2: the detection/segmentation setting
    rows = [('mae', 'mae', args.seed, [], 'mae'),
            ('dbot', 'dbot', args.seed, [], 'dbot, random teacher, 2 stages'),
            ('dbot-mae-teacher', 'dbot', args.seed, ['--teacher', teacher, '--stages', '1'],
             f'dbot, MAE-{epochs} teacher, 1 stage'),
            ('mrmae-mae-teacher', 'mrmae', args.seed, ['--teacher', teacher], f'mrmae, MAE-{epochs} teacher'),
            ('dbot-mae-teacher-2stages', 'dbot', args.seed, ['--teacher', teacher, '--stages', '2'],
             f'dbot, MAE-{epochs} teacher, 2 stages'),
            (f'mae-seed{args.seed + 1}', 'mae', args.seed + 1, [], f'mae, seed {args.seed + 1}'),
            ('dbot-3stages', 'dbot', args.seed, ['--stage_epochs', ','.join(map(str, thirds))],
             'dbot, random teacher, 3 stages')]
    return [row for row in rows if '--stage_epochs' not in row[3] or min(thirds) > 0]


def curve_plan(args, budget, results, work):
    """The learning curve: every row pre-trained for one longer schedule that keeps the checkpoints at the points of
    the curve, each then evaluated frozen. A point before the schedule's end is not a shorter run: its lr has not
    decayed yet. MAE comes first: its encoder is the students' teacher."""
    epochs, points = budget['curve']
    curve, runs = results / 'curve', []
    for row, method, seed, extra, _ in curve_rows(args, results, epochs):
        name, out = f'{row}-e{epochs}', work / 'curve' / f'{row}-e{epochs}'
        after = [keep_log_and_figure(curve)] + [keep_teacher_encoder(results)] * (row == 'mae')
        runs.append(Invocation(name, train, pretrain_flags(args, budget, epochs) + [
            '--method', method, '--seed', str(seed), *extra, '--save_epochs', ','.join(map(str, points)),
            '--output_dir', str(out)], pretrain_summary(epochs), after))
        for point in points:
            runs.append(frozen_run(f'{name}-epoch{point}-frozen', args, budget,
                                   ['--checkpoint', str(out / f'checkpoint-epoch{point}.pth')], seed,
                                   work / 'curve' / f'{name}-epoch{point}-frozen', frozen_at(method, point)))
    return runs


def frozen_at(method, epoch):
    def summarise(out):
        summary = frozen_summary(out)
        return summary and dict(method=method, pretrain_epochs=epoch, **summary)
    return summarise


# -----------------------------------------------------------------------------------------------------------------
# The table and the figures, from the records

def read_records(records):
    return {path.stem: json.loads(path.read_text()) for path in sorted(records.glob('*.json'))}


def pretraining_cells(row, records, budget):
    """Epochs, minutes (the MR rows' teachers included) and img/s of the row's pre-training."""
    if row == 'random-init':
        return '0', '0', '-'
    if row == 'dbot-stage1':
        return f'{budget["pretrain_epochs"] // 2} (dBOT\'s first stage)', 'in dBOT\'s', '-'
    record = records.get(row)
    if record is None:
        return 'pending', 'pending', 'pending'
    teachers = sum(records[name]['seconds'] for name in TEACHER_ROWS) if row.startswith('mr') else 0.0
    return str(record['epochs']), f'{(record["seconds"] + teachers) / 60:.0f}', f'{record["img_per_s"]:.0f}'


def table(records, budget):
    lines = ['| encoder | targets | pre-train epochs | pre-train min (teachers incl.) | pre-train img/s | k-NN top-1 | '
             'linear top-1 | fine-tune top-1 | fine-tune min |', '|' + '---|' * 9]
    for row, targets in TARGETS.items():
        frozen, tuned = records.get(f'{row}-frozen'), records.get(f'{row}-finetune')
        cells = [row, targets, *pretraining_cells(row, records, budget)]
        cells += [f'{frozen[key]:.1f}' if frozen else 'pending' for key in ('knn_acc1', 'linear_acc1')]
        if row not in budget['fine_tune']:
            cells += ['-', '-']  # frozen evaluations only
        else:
            cells += [f'{tuned["top1"]:.1f}', f'{tuned["seconds"] / 60:.0f}'] if tuned else ['pending', 'pending']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def machines(records):
    """Which machine and thread count each run had: one line when every run had the same."""
    runs_on = {}
    for name, record in records.items():
        runs_on.setdefault(f'{record["machine"]}, OMP_NUM_THREADS={record["omp_num_threads"]}', []).append(name)
    if len(runs_on) == 1:
        return f'Every run: {next(iter(runs_on))}.\n'
    return ''.join(f'{setting}: {", ".join(names)}.\n' for setting, names in runs_on.items())


def noise_table(records, seed):
    """The cheapest rows with two seeds: how far apart two rows must be before they differ."""
    lines = [f'| encoder (frozen) | k-NN top-1, seed {seed} | seed {seed + 1} | linear top-1, seed {seed} | '
             f'seed {seed + 1} |', '|---|---|---|---|---|']
    for row in ('random-init', 'mae'):
        pair = [records.get(f'{row}-frozen'), records.get(f'{row}-seed{seed + 1}-frozen')]
        if all(pair):
            lines.append(f'| {row} | ' + ' | '.join(f'{record[key]:.1f}' for key in ('knn_acc1', 'linear_acc1')
                                                      for record in pair) + ' |')
    return '\n'.join(lines) + '\n' if len(lines) > 2 else ''


def top1_chart(records, path):
    """Top-1 of every encoder by every evaluation, as grouped horizontal bars."""
    rows = [row for row in TARGETS if f'{row}-frozen' in records]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.55 * len(rows)))
    labels = ('k-NN', 'linear classifier on cached frozen features', 'fine-tune')
    for i, (label, kind, key) in enumerate(zip(labels, ('frozen', 'frozen', 'finetune'),
                                               ('knn_acc1', 'linear_acc1', 'top1'))):
        done = [(r, records[f'{row}-{kind}'][key]) for r, row in enumerate(rows) if f'{row}-{kind}' in records]
        if done:  # an evaluation not run (yet) gets no bar, not a bar at 0
            positions, values = zip(*done)
            bars = ax.barh([r + (i - 1) * 0.27 for r in positions], values, height=0.27, label=label)
            ax.bar_label(bars, fmt='%.1f', fontsize=7, padding=2)
    classes = {record['data']['classes'] for record in records.values() if 'data' in record}
    if len(classes) == 1:  # what guessing scores: the floor every bar is read against
        chance = 100 / classes.pop()
        ax.axvline(chance, color='black', linestyle=':', label=f'chance ({chance:.0f} %)')
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel('top-1 accuracy on the validation images (%)')
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_chart(results, path):
    """Pre-training loss, one panel per method (their losses have different units), in the table's order."""
    order = {name: i for i, name in enumerate(TARGETS)}  # the table's order; other seeds after
    paths = sorted((results / 'logs').glob('*.jsonl'), key=lambda path: (order.get(path.stem, len(order)), path.stem))
    logs = {path.stem: [json.loads(line) for line in path.read_text().splitlines()] for path in paths}
    if not logs:
        return
    steps = {path.stem: [json.loads(line) for line in path.read_text().splitlines()]
             for path in (results / 'logs' / 'steps').glob('*.jsonl')}
    columns = min(3, len(logs))
    rows_of_panels = -(-len(logs) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(3.4 * columns, 4.3 * rows_of_panels), squeeze=False,
                             layout='constrained')  # room for the legends below the panels
    for ax in axes.flat[len(logs):]:
        ax.axis('off')
    for ax, (name, rows) in zip(axes.flat, logs.items()):
        loss_panel(ax, name, rows, steps.get(name, []))
    fig.savefig(path, dpi=110)
    plt.close(fig)


TERM_STYLES = [('o', '-'), ('s', '--'), ('^', '-.'), ('v', ':')]  # marker and line of the loss, then each term


def loss_panel(ax, name, rows, windows):
    """One run's loss and its terms (MR-MAE's): each epoch's mean as a point at the epoch's middle and, where the run
    kept steps.jsonl, the means between log points as a thin line; a dBOT stage starts its line afresh."""
    stages = sorted({row['stage'] for row in rows})
    for i, key in enumerate(['loss'] + sorted(k for k in rows[0] if k.startswith('loss_'))):
        marker, linestyle = TERM_STYLES[i % len(TERM_STYLES)]  # two terms of equal value must both stay visible
        for stage in stages:  # a new teacher gives a new loss
            in_stage = [row for row in rows if row['stage'] == stage]
            ax.plot([row['epoch'] + 0.5 for row in in_stage], [row[key] for row in in_stage], marker=marker,
                    linestyle=linestyle, fillstyle='none' if i else 'full', color=f'C{i}',
                    label=key if stage == stages[0] else None)
            in_stage = [w for w in windows if w['stage'] == stage]
            ax.plot([w['epoch'] + (w['first_step'] + w['end_step']) / 2 / w['steps_per_epoch'] for w in in_stage],
                    [w[key] for w in in_stage], color=f'C{i}', linestyle=linestyle, linewidth=0.8, alpha=0.6,
                    label='between log points' if (i, stage) == (0, stages[0]) and windows else None)
    for row, previous in zip(rows[1:], rows):
        if row['stage'] != previous['stage']:
            ax.axvline(row['epoch'], color='grey', linestyle=':', label='new stage')
    ax.set_xlim(0, rows[-1]['epoch'] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(name)
    ax.set_xlabel('epoch (points: each epoch\'s mean)')
    ax.set_ylabel('training loss')
    # below the panel, not over the curves
    ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.22), frameon=False)


def write_report(args, budget, results):
    records = read_records(results / 'runs')
    text = table(records, budget) + '\n' + machines(records) + '\n' + noise_table(records, args.seed)
    (results / 'results.md').write_text(text)
    top1_chart(records, results / 'top1.png')
    loss_chart(results, results / 'pretrain_loss.png')
    print(f'from the {len(records)} records in {results / "runs"}:\n{text}')


def random_init_band(records, seed):
    """The frozen top-1s of the random-init encoders (both seeds): what an encoder that learned nothing scores."""
    pair = [records.get('random-init-frozen'), records.get(f'random-init-seed{seed + 1}-frozen')]
    return {key: (min(r[key] for r in pair), max(r[key] for r in pair)) for key in ('knn_acc1', 'linear_acc1')} \
        if all(pair) else None


def curve_teacher(records, epochs):
    """The students' teacher's own frozen top-1s (MAE's encoder at the schedule's end), or None before it exists."""
    return records.get(f'mae-e{epochs}-epoch{epochs}-frozen')


def curve_points(records, labels):
    """The curve's frozen evaluations by row, in the order of the plan: {row label: [records by epochs seen]}."""
    points = {}
    for name, label in labels.items():
        of_row = [r for r in records.values() if 'pretrain_epochs' in r and r['run'].rsplit('-epoch', 1)[0] == name]
        if of_row:
            points[label] = sorted(of_row, key=lambda r: r['pretrain_epochs'])
    return points


def curve_table(records, labels, epochs, band):
    lines = [f'| row | epochs seen (of a {epochs}-epoch schedule) | k-NN top-1 | linear top-1 |', '|---|---|---|---|']
    if band:
        lines.append('| random-init (seeds 0 and 1) | 0 | ' + ' | '.join(
            f'{low:.1f} to {high:.1f}' for low, high in band.values()) + ' |')
    teacher = curve_teacher(records, epochs)
    if teacher:
        lines.append(f'| the students\' teacher (MAE-{epochs}\'s encoder) | {epochs} | {teacher["knn_acc1"]:.1f} | '
                     f'{teacher["linear_acc1"]:.1f} |')
    for label, row in curve_points(records, labels).items():
        lines += [f'| {label} | {r["pretrain_epochs"]} | {r["knn_acc1"]:.1f} | {r["linear_acc1"]:.1f} |' for r in row]
    pretraining = [r for r in records.values() if 'final_loss' in r]
    lines += ['', '| pre-training | epochs | minutes | img/s | final loss |', '|---|---|---|---|---|']
    lines += [f'| {r["run"]} | {r["epochs"]} | {r["seconds"] / 60:.0f} | {r["img_per_s"]:.0f} | {r["final_loss"]:.3f} |'
              for r in sorted(pretraining, key=lambda r: r['run'])]
    return '\n'.join(lines) + '\n'


def curve_chart(records, labels, epochs, band, path):
    """Top-1 against the epochs seen, one line per row, one panel per evaluation; the random-init band across, and
    the teacher's own top-1 as a dashed line, so that each student is read as above, at or below its teacher."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    teacher = curve_teacher(records, epochs)
    for ax, (key, title) in zip(axes, (('knn_acc1', 'k-NN (k = 20)'), ('linear_acc1', 'linear on frozen features'))):
        if band:
            ax.axhspan(*band[key], color='grey', alpha=0.3, label='random-init, seeds 0 and 1')
        if teacher:
            ax.axhline(teacher[key], color='black', linestyle='--', linewidth=1,
                       label=f'the students\' teacher (MAE-{epochs})')
        for i, (label, row) in enumerate(curve_points(records, labels).items()):
            ax.plot([r['pretrain_epochs'] for r in row], [r[key] for r in row], marker='o', color=f'C{i}', label=label)
        ax.set_xlim(0, epochs + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f'epochs seen in a {epochs}-epoch schedule')
        ax.set_ylabel('top-1 on the validation images (%)')
        ax.set_title(title)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc='lower center', ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))  # the shared legend below the panels, not over the curves
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_curve_report(args, budget, results, curve):
    records, epochs = read_records(curve / 'runs'), budget['curve'][0]
    labels = {f'{row}-e{epochs}': label for row, _, _, _, label in curve_rows(args, results, epochs)}
    band = random_init_band(read_records(results / 'runs'), args.seed)
    text = curve_table(records, labels, epochs, band) + '\n' + machines(records)
    (curve / 'curve.md').write_text(text)
    curve_chart(records, labels, epochs, band, curve / 'curve.png')
    print(f'from the {len(records)} records in {curve / "runs"}:\n{text}')


clock = time.monotonic  # seconds, for --max_minutes


@contextmanager
def time_limit(minutes):
    """--max_minutes: at the deadline the run in progress is asked to stop as a signal would (it checkpoints where it
    has state), and no further run starts. -> a function that tells whether the deadline has passed."""
    if minutes is None:
        yield lambda: False
        return
    deadline = clock() + 60 * minutes
    timer = threading.Timer(60 * minutes, runtime.request_stop)
    timer.daemon = True
    timer.start()
    try:
        yield lambda: clock() >= deadline
    finally:
        timer.cancel()


def main(args):
    with runtime.stop_on_signals():  # between runs a signal ends the sitting in one line; in a run, as that run says
        reproduce(args)


def reproduce(args):
    budget = BUDGETS[args.budget]
    if args.curve and not budget['curve']:
        runtime.fail(f'--curve: the {args.budget} budget has no learning curve (it is defined for '
                   f'{", ".join(name for name, b in BUDGETS.items() if b["curve"])})')
    for split in ('train', 'val'):
        if not (Path(args.data) / split).is_dir():
            runtime.fail(f'--data {args.data}: no {split}/ folder (an ImageFolder root with train/ and val/ is needed)')
    work = Path(args.work_dir or f'output/reproduce-{args.budget}')
    results = Path(args.output_dir or work / 'results')
    curve = results / 'curve'
    base = curve if args.curve else results
    data = data_fingerprint(args.data)
    check_records_are_of(data, results / 'runs', curve / 'runs')
    for folder in ('runs', 'logs', 'figures'):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (results / 'encoders').mkdir(exist_ok=True)  # the teachers: the table's MR rows', the curve's students'
    runs = curve_plan(args, budget, results, work) if args.curve else plan(args, budget, results, work)
    (base / 'commands.txt').write_text(''.join(run.command() + '\n' for run in runs))
    with time_limit(args.max_minutes) as out_of_time:
        for run in runs:
            if out_of_time() or not execute(run, base / 'runs', data):
                print(f'stopped at {run.name}; the same command continues it')
                break
    finished = [run.name for run in runs if (base / 'runs' / f'{run.name}.json').exists()]
    print(f'finished ({len(finished)} of {len(runs)}): {", ".join(finished) or "none"}')
    print(f'unfinished: {", ".join(run.name for run in runs if run.name not in finished) or "none"}')
    if args.curve:
        write_curve_report(args, budget, results, curve)
    else:
        write_report(args, budget, results)


if __name__ == '__main__':
    runtime.script(lambda: main(get_args_parser().parse_args()))
