"""
Checkpoints, for train.py and finetune.py alike: files written so that a kill at any moment leaves the previous one
intact, read back in one line whatever is wrong with them, and the epoch boundary both loops cross (where an epoch
begins when a run continues, a signal's mid-epoch save with every rank's exact position, the end of an epoch), so
that a restarted run continues where it stopped.
"""

import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

import runtime
from teachers import load_weights_file


def save_checkpoint(state, path):
    """Write to a temp file, fsync, then rename: a kill during the save leaves the previous file intact. A failed
    write (a full disk) removes the temp file and ends the run in one line; the previous file still stands. A path
    ending in .safetensors (in any case: the name promises no pickle inside) gets that format (`state`: tensors
    only), any other torch.save's pickle."""
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            if path.suffix.lower() == '.safetensors':
                f.write(safetensors.torch.save({k: v.detach().contiguous() for k, v in state.items()}))
            else:
                torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            runtime.fail(f'could not write {path} ({" ".join(str(e).split())[:200]}); the previous {path.name}, if '
                         f'any, is intact: make room (or fix the folder) and rerun the same command')
        raise


def load_checkpoint(path, required_keys=()):
    try:
        checkpoint = load_weights_file(path)
    except Exception as e:  # truncated, foreign or missing: one line, whatever torch raised
        runtime.fail(f'cannot read checkpoint {path}: {" ".join(str(e).split())[:300]}')
    missing = [key for key in required_keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        runtime.fail(f'{path} is not a checkpoint of this script (it has no {", ".join(missing)})')
    return checkpoint


def read_resumed(run, required, on_resume, identity):
    """The checkpoint `run` (a runtime.Run) continues: --resume, else OUTPUT_DIR/checkpoint-last.pth when there is
    one, into run.resume, run.ckpt (None when there is none) and run.last_row. `required`: the keys besides 'args'
    its script's checkpoints hold; a checkpoint of another run, or changed flags, as on_resume (flags.OnResume) and
    this run's `identity` say."""
    run.resume = Path(run.args.resume) if run.args.resume else run.out / 'checkpoint-last.pth'
    if run.args.resume or run.resume.exists():
        run.ckpt = load_checkpoint(run.resume, ('args', *required))
        on_resume.check(run.ckpt, run.args, identity, run.resume, run.is_main)
        run.last_row = run.ckpt.get('log_row')


def restore_training(run, model, optimizer):
    """The weights, the optimizer's state (moments, step counts) and the epoch of the checkpoint being resumed; its
    weights freed then (the model and optimizer hold them: the run keeps the position, not a second copy); log.jsonl
    made to say what it covers. The optimizer's hyperparameters (weight decay, betas, eps, lr scales) stay this
    run's, as its flags set them: load_state_dict would bring back the saved ones, silently undoing a changed
    schedule flag that flags.OnResume announced."""
    ckpt, path = run.ckpt, run.resume
    load_state(model, ckpt['model'], f'{path} ({ckpt["args"].get("method")} {ckpt["args"].get("model")})')
    settings = [{key: value for key, value in group.items() if key != 'params'} for group in optimizer.param_groups]
    load_state(optimizer, ckpt['optimizer'], f'the optimizer state in {path}')
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    run.start_epoch = ckpt['epoch']
    run.ckpt = {key: value for key, value in ckpt.items() if key not in ('model', 'optimizer', 'teacher')}
    if run.is_main:
        print(f'resumed from {path} at epoch {run.start_epoch}, step {ckpt["step"]}')
        restore_log(run.out / 'log.jsonl', lambda row: row['epoch'] < run.start_epoch, run.last_row)


def load_state(module, state, source):
    """load_state_dict, with a mismatch reported in one line that names the keys and shapes that disagree."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        runtime.fail(f'{source} does not fit this run: {" ".join(str(e).split())[:800]}')


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


# -----------------------------------------------------------------------------------------------------------------
# The epoch boundary, as train.py and finetune.py both cross it

def gather_positions(device, **sums):
    """Where every rank stands in an epoch that a signal interrupts: each rank's own RNG states (its masks, drop-path
    and crops differ from the other ranks') and partial loss sums, gathered in rank order for the checkpoint."""
    sums = {name: {k: v.cpu() for k, v in value.items()} if isinstance(value, dict) else value.cpu()
            for name, value in sums.items()}
    return runtime.gather_from_ranks(dict(rng_state=runtime.rng_states(device), **sums))


def own_position(checkpoint, rank, world_size, path):
    """This rank's part of gather_positions() in a checkpoint. An epoch cut at a step continues only on as many
    processes as it began with: each one's share of the epoch and its random streams belong to that split."""
    positions = checkpoint.get('ranks') or [checkpoint]  # checkpoints of one process before per-rank positions
    if len(positions) != world_size:
        runtime.fail(f'{path} stopped mid-epoch in a run of {len(positions)} process(es); continue it with '
                     f'{len(positions)} (torchrun --nproc_per_node {len(positions)}), not {world_size}')
    return positions[rank]


def epoch_start(run, epoch):
    """Where an epoch of `run` (a runtime.Run) begins -> (0, None), or in the epoch a signal interrupted (the step it
    stopped after, this rank's saved position: its RNG states and partial loss sums)."""
    if not (run.ckpt and run.ckpt['step'] and epoch == run.start_epoch):
        return 0, None
    return run.ckpt['step'], own_position(run.ckpt, run.rank, run.world_size, run.resume)


def save_mid_epoch(run, state, epoch, steps_done, **sums):
    """A signal stops the run mid-epoch: `state` (weights, optimizer, flags, the last log row) and every rank's exact
    position (RNG states, partial sums) go into the checkpoint, which rank 0 writes; the same command continues."""
    positions = gather_positions(run.device, **sums)
    if run.is_main:
        save_checkpoint(dict(state, epoch=epoch, step=steps_done, ranks=positions), run.out / 'checkpoint-last.pth')
        print(f'\nstopped by a signal in epoch {epoch} after step {steps_done}; the same command continues from '
              f'{run.out / "checkpoint-last.pth"}')
    runtime.barrier()


def save_epoch(run, state, epoch, also=()):
    """The end of an epoch, whose log row is run.last_row: the checkpoint first, holding that row, then the row in
    log.jsonl, so that the log never shows an epoch no checkpoint covers (and a run killed between the two writes
    gets the row back). `also`: further files that keep this checkpoint (the best, ...)."""
    state, row = dict(state, epoch=epoch + 1, step=0), run.last_row
    if run.is_main:
        for path in also:
            save_checkpoint(state, path)
        save_checkpoint(state, run.out / 'checkpoint-last.pth')
        with open(run.out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        tqdm.write(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
    runtime.barrier()
