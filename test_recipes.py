"""Every command in docs/ that runs train.py or finetune.py passes that script's own flag checks, and the commands of
the official recipes carry the official code's values (one table below, each row citing its file): a wrong, stale or
missing recipe fails here."""

import math
import re
import shlex
from pathlib import Path

import pytest

import finetune
import train

HERE = Path(__file__).parent
DOCS = {path.name: path.read_text() for path in [HERE / 'README.md', *sorted((HERE / 'docs').glob('*.md'))]}

# The official pre-training recipes. Batch: the effective one (per process x processes x accumulation).
MAE = dict(blr=1.5e-4, weight_decay=0.05, warmup_epochs=40, batch=4096, epochs=1600, mask_ratio=0.75,
           norm_pix_loss=True, clip_grad=None, decoder=(512, 8, 16), min_lr=0.0)
PRETRAIN = {
    # facebookresearch/mae PRETRAIN.md (blr, batch, warm-up, decoder: models_mae.py); 1600 epochs: the paper's Table 4
    ('mae', 'vit_base'): dict(MAE, patch_size=16),
    ('mae', 'vit_large'): dict(MAE, patch_size=16),
    ('mae', 'vit_huge'): dict(MAE, patch_size=14),
    # liuxingbin/dbot main branch PRETRAIN.md and run.sh (warm-up 40)
    ('dbot', 'vit_base'): dict(MAE, patch_size=16, stage_epochs=[800, 800], drop_path=0.2, clip_grad=3.0,
                               teacher_depth=None),
    ('dbot', 'vit_large'): dict(MAE, patch_size=16, stage_epochs=[800, 800], drop_path=0.2, teacher_depth=0),
    ('dbot', 'vit_huge'): dict(MAE, patch_size=14, stage_epochs=[800, 800], drop_path=0.3, teacher_depth=0),
    # liuxingbin/dbot beit branch PRETRAIN.md and run.sh: lr 3e-3 at batch 4096, betas 0.9/0.98, eps 1e-6, 10 warm-up
    # epochs, min lr 1e-5, 78 of 196 patches masked, one stage
    ('dbot', 'vit_base', 'clip'): dict(blr=3e-3 * 256 / 4096, weight_decay=0.05, warmup_epochs=10, batch=4096,
                                       epochs=1600, stage_epochs=[1600], betas=[0.9, 0.98], opt_eps=1e-6,
                                       drop_path=0.1, clip_grad=3.0, min_lr=1e-5, mask_ratio=0.4),
    # Alpha-VL/ConvMAE PRETRAIN.md: 3 nodes x 8 GPUs x 128
    ('mcmae', 'vit_base'): dict(MAE, patch_size=16, batch=3072),
}
# The official fine-tuning recipes, at the effective batch 1024.
FT = dict(batch=1024, warmup_epochs=5, weight_decay=0.05, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
          clip_grad=None)
FINETUNE = {
    # facebookresearch/mae FINETUNE.md; head std: main_finetune.py
    ('mae', 'vit_base'): dict(FT, blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100, head_init_std=2e-5),
    ('mae', 'vit_large'): dict(FT, blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50, head_init_std=2e-5),
    ('mae', 'vit_huge'): dict(FT, blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50, head_init_std=2e-5),
    # liuxingbin/dbot main branch DOWNSTREAM.md and run.sh (layer decay 0.65 and drop path 0.1 by default there);
    # head std: main_finetune.py
    ('dbot', 'vit_base'): dict(FT, blr=3e-4, layer_decay=0.65, drop_path=0.1, epochs=100, head_init_std=0.01),
    ('dbot', 'vit_large'): dict(FT, blr=3e-4, layer_decay=0.75, drop_path=0.25, epochs=50, head_init_std=0.01,
                                clip_grad=1.0),
    ('dbot', 'vit_huge'): dict(FT, blr=3e-4, layer_decay=0.75, drop_path=0.3, epochs=50, head_init_std=0.01),
    # Alpha-VL/ConvMAE FINETUNE.md; head std: main_finetune.py
    ('convmae', 'vit_base'): dict(FT, blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100, head_init_std=2e-5),
}


def commands():
    """(page, the script, its argv, processes) of every train.py / finetune.py command in docs/."""
    found = []
    for page, text in DOCS.items():
        for line in text.replace('\\\n', ' ').splitlines():
            words = shlex.split(line.strip(), comments=True) if re.match(r'\s*(\w+=\S+\s+)*(torchrun|python) ', line) else []
            script = next((w for w in words if w in ('train.py', 'finetune.py')), None)
            if script:
                launcher = words[:words.index(script)]
                processes = (int(launcher[launcher.index('--nproc_per_node') + 1]) if '--nproc_per_node' in launcher
                             else 1)
                found.append((page, script, words[words.index(script) + 1:], processes))
    return found


COMMANDS = commands()


def checked(script, argv, tmp_path):
    """The command's flags after its script's own checks (the same calls its main makes first)."""
    if script == 'train.py':
        args = train.get_args_parser().parse_args(argv)
        train.refuse_unused_flags(args)
        train.validate_args(args)
        return args
    checkpoint = tmp_path / 'stands-in-for-the-checkpoint.pth'  # validate_args wants the file to exist
    checkpoint.touch()
    at = argv.index('--checkpoint') + 1
    args = finetune.get_args_parser().parse_args(argv[:at] + [str(checkpoint)] + argv[at + 1:])
    finetune.validate_args(args)
    args.checkpoint = argv[at]
    return args


@pytest.mark.parametrize('page,script,argv,processes', COMMANDS,
                         ids=[f'{page}:{" ".join(argv)[:60]}' for page, _, argv, _ in COMMANDS])
def test_every_documented_command_passes_its_scripts_checks(page, script, argv, processes, tmp_path):
    checked(script, argv, tmp_path)


def pretraining_row(args):
    return (args.method, args.model) + (('clip',) if args.teacher == 'clip' else ())


def finetuning_row(args):
    name = re.fullmatch(r'(\w+?)_pretrain_(vit_\w+)\.pth', Path(args.checkpoint).name)
    return name and (name[1], name[2])


def values(args, processes, keys):
    batch = args.batch_size * getattr(args, 'accum_iter', 1) * processes
    have = dict(vars(args), batch=batch, decoder=(getattr(args, 'decoder_dim', None),
                                                 getattr(args, 'decoder_depth', None),
                                                 getattr(args, 'decoder_heads', None)))
    return {key: have[key] for key in keys}


def same(value, official):
    return math.isclose(value, official, rel_tol=1e-9) if isinstance(official, float) else value == official


def test_the_official_recipes_are_documented_with_the_official_values(tmp_path):
    seen = {}
    for page, script, argv, processes in COMMANDS:
        args = checked(script, argv, tmp_path)
        table, row = (PRETRAIN, pretraining_row(args)) if script == 'train.py' else (FINETUNE, finetuning_row(args))
        if row in table:
            assert (script, row) not in seen, f'{row} is documented twice ({page})'
            seen[script, row] = documented = values(args, processes, table[row])
            wrong = {key: (documented[key], official) for key, official in table[row].items()
                     if not same(documented[key], official)}
            assert not wrong, f'{page}: {" ".join(argv)}: (documented, official) {wrong}'
    official = {('train.py', row) for row in PRETRAIN} | {('finetune.py', row) for row in FINETUNE}
    assert official == set(seen), f'no command in docs/ for {sorted(official - set(seen))}'
