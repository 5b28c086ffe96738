"""
Checkpoints, for train.py and finetune.py alike: files written so that a kill at any moment leaves the previous one
intact, read back in one line whatever is wrong with them, and the epoch boundary both loops cross (where an epoch
begins when a run continues, a signal's mid-epoch save with every rank's exact position, the end of an epoch), so
that a restarted run continues where it stopped.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

import data
import runtime
from teachers import load_weights_file


UMASK = os.umask(0o022)  # read once (it can only be read by setting it), and put back
os.umask(UMASK)

# The layout of the checkpoints this code writes. A later layout (a newer version of this repository) is refused in
# one line rather than misread. 2: a teacher's weights in a file of their own, named by the checkpoint (keep_teacher).
FORMAT = 2


@contextmanager
def one_run(output_dir):
    """What a script's run (train.py's, finetune.py's) happens in: its one stop path (signals, a closed output, a
    blocked rank), its output folder held, the failures of its loaders, of device memory and of its peers each in
    one line; and at its end, however it ends, its last checkpoint on disk."""
    with runtime.stop_on_signals(), runtime.exclusive_output_dir(output_dir), data.loader_errors_in_one_line(), \
            runtime.out_of_memory_in_one_line(), runtime.lost_ranks_in_one_line():
        try:
            yield
        finally:
            with runtime.deferring_signals():  # a signal now waits for the last write, rather than losing it
                writer.wait()


def save_checkpoint(state, path):
    """Write to a temp file, fsync, then rename: a kill during the save leaves the previous file intact. A failed
    write (a full disk) removes the temp file and ends the run in one line; the previous file still stands. A path
    ending in .safetensors (in any case: the name promises no pickle inside) gets that format (`state`: tensors
    only), any other torch.save's pickle."""
    if path.exists() and not path.is_file():  # a folder, a device node, a named pipe: not a file a run writes over
        runtime.fail(f'{path} exists and is not a regular file: give another path')
    state = dict(state, format=FORMAT) if isinstance(state, dict) and 'args' in state else state
    # a temporary name of its own in the same folder (the rename stays atomic), never another file's
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    tmp = Path(tmp)
    os.fchmod(descriptor, 0o666 & ~UMASK)  # as open() would have made it, not mkstemp's owner-only 0600
    try:
        with os.fdopen(descriptor, 'wb') as f:
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
    written = checkpoint.get('format', 0) if isinstance(checkpoint, dict) else 0
    if not isinstance(written, int) or written > FORMAT:
        runtime.fail(f'{path} was written by a newer version of this repository (checkpoint format '
                     f'{written}; this code reads up to {FORMAT}): update the code')
    return refuse_missing_keys(checkpoint, path, required_keys)


def refuse_missing_keys(checkpoint, path, required_keys):
    missing = [key for key in required_keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        runtime.fail(f'{path} is not a checkpoint of this script (it has no {", ".join(missing)})')
    return checkpoint


def read_resumed(run, required, on_resume, identity):
    """The checkpoint `run` (a runtime.Run) continues: --resume, else OUTPUT_DIR/checkpoint-last.pth when there is
    one, into run.resume, run.ckpt (None when there is none), run.last_row and run.begun_from. `required`: the keys
    besides 'args' its script's checkpoints hold; a checkpoint of another run, or changed flags, as on_resume
    (flags.OnResume) and this run's `identity` say.
    --resume FILE begins the run from FILE, and its checkpoints record so (begun_from): the same command run again
    after a stop (a requeued job, a rerun) continues the folder's checkpoint-last.pth, rather than beginning from
    FILE again, which would undo the epochs trained since."""
    own = run.out / 'checkpoint-last.pth'
    run.resume = Path(run.args.resume) if run.args.resume else own
    if not run.resume.is_file() and (run.args.resume or os.path.lexists(own)):  # before any link is followed
        runtime.fail(f'cannot read checkpoint {run.resume}: no such file, or not a regular file (a folder, a link '
                     f'that loops)')
    ours = None  # the folder's own checkpoint, when --resume names another file
    if run.args.resume and own.exists() and own.resolve() != run.resume.resolve():
        ours = load_checkpoint(own, ('args',))
    continuing = ours is not None and bool(spellings(run.resume, run.out) & set(ours.get('begun_from', ())))
    if continuing:
        run.resume, begun = own, run.resume
    if run.args.resume or own.exists():
        run.ckpt = refuse_missing_keys(ours, own, ('args', *required)) if continuing else \
            load_checkpoint(run.resume, ('args', *required))
    if not continuing and (run.args.resume or not own.exists()):  # a fresh start, or FILE that did not begin it
        refuse_another_runs_folder(run, on_resume, ours)
    if run.ckpt:
        on_resume.check(run.ckpt, run.args, identity, run.resume, run.is_main)
        run.last_row = run.ckpt.get('log_row')
    if continuing and run.is_main:
        again = f'rewind to {begun} again, delete {own}' if in_folder(begun, run.out) else \
            f'begin from {begun} again, give an empty --output_dir'
        print(f'note: {own} is this run begun from --resume {begun} (now at epoch {run.ckpt["epoch"]}): it goes on '
              f'from there; to {again}')
    run.begun_from = begun_from(run, continuing)
    refuse_differing_positions(run)


def finished_already(run, epochs):
    """Whether the run resumed has already trained its `epochs` (a finished run's command run again): said so."""
    if run.start_epoch < epochs:
        return False
    if run.is_main:
        print(f'nothing to do: {run.resume} has already trained {run.start_epoch} of {epochs} epochs')
    return True


def spellings(path, out):
    """A --resume path as typed, made absolute (a link re-pointed since is still the file the command names);
    resolved (the same file by another spelling); and relative to --output_dir `out` (the same command after the
    project's folder moved, or on a node that mounts it elsewhere)."""
    typed = os.path.abspath(path)
    return {typed, str(Path(path).resolve()), 'output_dir:' + os.path.relpath(typed, os.path.abspath(out))}


def begun_from(run, continuing):
    """The --resume files the run's checkpoints descend from: a file in another folder begins a new line; one in
    the run's own folder (a rewind, or its checkpoint-last.pth) adds to the line's files, so that the command of
    each start, run again, continues the run."""
    kept = list(run.ckpt.get('begun_from', ())) if run.ckpt else []
    if not run.args.resume or continuing:
        return kept
    added = spellings(run.resume, run.out)
    return sorted(set(kept) | added) if in_folder(run.resume, run.out) else sorted(added)


def in_folder(path, folder):
    """Whether the file `path` names (through links too) lies in `folder`: a run's own checkpoint."""
    return Path(path).resolve().parent == Path(folder).resolve()


def refuse_differing_positions(run):
    """Every rank continues from the same position, or none does: ranks that read different checkpoints (an output
    folder on each node's own disk) would otherwise wait for each other forever in different epochs."""
    mine = (run.ckpt['epoch'], run.ckpt['step'], run.resume.stat().st_size) if run.ckpt else None
    positions = runtime.gather_from_ranks(mine)
    if len(set(positions)) > 1:
        seen = '; '.join(f'rank {rank}: ' + (f'epoch {p[0]} step {p[1]}' if p else 'no checkpoint')
                         for rank, p in enumerate(positions))
        runtime.fail(f'the ranks found different checkpoints in --output_dir {run.out} ({seen}): the output folder '
                     f'must be on a file system that every node sees (the same path on each)')


def keep_teacher(run, state, resumed=None):
    """What a run's checkpoints keep of the teacher of its current stage, whose state (the method's teacher_state)
    is `state`. Weights that exist nowhere else (dBOT's bootstrapped students, its random first teacher, the encoder
    of a teacher file) are written once per stage, as OUTPUT_DIR/teacher-stageK.pth, and every checkpoint names that
    file and the write's own id: an epoch's save neither copies nor rewrites an unchanged teacher (~10 GB for dBOT's
    ViT-H). What is small (MR-MAE's and CLIP's file hashes) stays in the checkpoint. A run resumed in its own folder
    keeps its file (`resumed`: the checkpoint's reference). Only rank 0 writes, and only its checkpoints hold this."""
    if not holds_weights(state):
        return state
    path = run.out / f'teacher-stage{run.stage}.pth'
    if isinstance(resumed, dict) and 'teacher_file' in resumed and \
            (run.resume.parent / resumed['teacher_file']).resolve() == path.resolve():
        return resumed
    reference = dict(teacher_file=path.name, written=uuid.uuid4().hex)
    if run.is_main:
        save_checkpoint(dict(model=state, args=vars(run.args), stage=run.stage, written=reference['written']), path)
    return reference


def holds_weights(state):
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def saved_teacher(run):
    """The teacher state of the checkpoint being resumed: its file read when it names one (keep_teacher), checked to
    be the very file it was trained with."""
    kept = run.ckpt['teacher']
    if not (isinstance(kept, dict) and 'teacher_file' in kept):
        return kept  # in the checkpoint: file hashes, or a teacher's weights (format 1)
    path = run.resume.parent / kept['teacher_file']
    if not path.is_file():
        runtime.fail(f'{run.resume} names its teacher {path}, which is not there: put the run\'s teacher-stage files '
                     f'back next to its checkpoint')
    teacher = load_checkpoint(path, ('model',))
    if teacher.get('written') != kept['written']:
        runtime.fail(f'{path} is not the teacher {run.resume} was trained with (it was written again since: a run '
                     f'rewound to an earlier stage?): resume from that run\'s checkpoint-last.pth, or start afresh')
    return teacher['model']


def announce_world_size(run, steps_per_epoch):
    """Between epochs a run may continue on another number of processes (a lost node, a larger allocation): its
    effective batch, lr and steps per epoch change with it, and the run says so, as for a changed --batch_size (in
    the middle of an epoch own_position refuses it)."""
    before = run.ckpt.get('world_size') if run.ckpt else None
    if run.is_main and before and before != run.world_size:
        print(f'note: {run.resume} was trained on {before} process(es); this run continues on {run.world_size}: '
              f'effective batch {run.eff_batch // run.world_size * before} -> {run.eff_batch}, peak lr '
              f'{run.peak_lr / run.world_size * before:.3g} -> {run.peak_lr:.3g}, about '
              f'{steps_per_epoch * run.world_size // before} -> {steps_per_epoch} steps per epoch')


def refuse_another_runs_folder(run, on_resume, own):
    """A run that does not continue --output_dir's checkpoint-last.pth (a fresh start, or --resume FILE that did not
    begin it) would overwrite the checkpoints there and splice the logs: refused when the folder holds any, unless
    FILE is one of them (checkpoint-epoch4.pth) and of the same run as its checkpoint-last.pth (`own`, if any): that
    rewinds the run, and the log is cut back to what FILE covers. Which run a file of another folder continues, if
    any, cannot be told from its flags: two seeds share them."""
    if run.args.resume and in_folder(run.resume, run.out):
        if own is None or on_resume.saved_identity(own) == on_resume.saved_identity(run.ckpt):
            return
        held = ['checkpoint-last.pth']
    else:
        held = sorted(path.name for path in run.out.glob('checkpoint-*.pth'))
    if not held:
        return
    if own is None:
        runtime.fail(f'--output_dir {run.out} holds checkpoints of another run ({", ".join(held)}) but no '
                     f'checkpoint-last.pth, which this run would overwrite: --resume one of them to continue from it, '
                     f'or give an empty --output_dir')
    runtime.fail(f'--output_dir {run.out} holds another run ({", ".join(held)}, not begun from --resume '
                 f'{run.resume}), which this one would overwrite: drop --resume to continue that run, or give an '
                 f'empty --output_dir to begin from {run.resume}')


def restore_run_log(run, name, covered, last_row=None):
    """The resumed run's log `name` made to say what its checkpoint covers (restore_log). A run begun from another
    folder's file keeps none of the rows there: they are another run's (one deleted, or killed before its first
    checkpoint), and its own earlier rows are in that folder's logs."""
    new_line = not in_folder(run.resume, run.out)
    restore_log(run.out / name, lambda row: not new_line and covered(row), last_row)


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
        rewind_to(run)
        restore_run_log(run, 'log.jsonl', lambda row: row['epoch'] < run.start_epoch, run.last_row)


def rewind_to(run):
    """--resume of an earlier checkpoint of the run in its own folder (checkpoint-epochN.pth) makes it the folder's
    checkpoint-last.pth at once, before the logs are cut back to it: a run killed before its next save then continues
    from the rewound position, not from the later one that the logs no longer cover."""
    own = run.out / 'checkpoint-last.pth'
    if not in_folder(run.resume, run.out) or run.resume.resolve() == own.resolve():
        return
    if own.exists():
        print(f'note: rewinding {run.out}: its checkpoint-last.pth is replaced by {run.resume} (epoch '
              f'{run.start_epoch})')
    descriptor, tmp = tempfile.mkstemp(dir=run.out, prefix=f'.{own.name}.', suffix='.tmp')
    os.close(descriptor)
    try:
        shutil.copyfile(run.resume, tmp)
        os.replace(tmp, own)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        runtime.fail(f'could not copy {run.resume} to {own} ({e.strerror}): make room and rerun the same command')


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
    for number, line in enumerate(log_path.read_bytes().splitlines() if log_path.exists() else [], 1):
        try:  # a byte that is no UTF-8 (a disk error, an editor's encoding) makes a line no log row
            row = json.loads(line.decode())
            keep = covered(row)
        except (ValueError, KeyError, TypeError):
            print(f'warning: dropping line {number} of {log_path}, not a log row: {line[:60]!r}', file=sys.stderr)
            continue
        rows += [row] if keep else []
    if last_row is not None and last_row['epoch'] not in {row['epoch'] for row in rows}:
        rows.append(last_row)
    if rows or log_path.exists():  # no empty log where there was none: a log file says an epoch or a window ended
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


def save_mid_epoch(run, state, epoch, steps_done, why='by a signal', **sums):
    """A signal stops the run mid-epoch: `state` (weights, optimizer, flags, the last log row) and every rank's exact
    position (RNG states, partial sums) go into the checkpoint, which rank 0 writes; the same command continues."""
    positions = gather_positions(run.device, **sums)
    writer.wait()  # an epoch's checkpoint still being written comes first
    if run.is_main:
        save_checkpoint(dict(state, epoch=epoch, step=steps_done, ranks=positions), run.out / 'checkpoint-last.pth')
        print(f'\nstopped {why} in epoch {epoch} after step {steps_done}; the same command continues from '
              f'{run.out / "checkpoint-last.pth"}')
    runtime.barrier()


def stamp(run):
    """What a log row says of when and at what cost it was written: the wall-clock time (UTC), the seconds since this
    process started, and on a GPU the peak memory the run has held (the allocator's count: no device sync)."""
    stamp = dict(time=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                 elapsed_s=round(time.time() - run.started, 1))
    if run.device.type == 'cuda':
        stamp['max_memory_gib'] = round(torch.cuda.max_memory_allocated(run.device) / 2 ** 30, 2)
    return stamp


def save_epoch(run, state, epoch, also=()):
    """The end of an epoch, whose log row is run.last_row: the checkpoint first, holding that row, then the row in
    log.jsonl, so that the log never shows an epoch no checkpoint covers (and a run killed between the two writes
    gets the row back). `also`: further files that keep this checkpoint (the best, ...). Rank 0 writes them in the
    background (BackgroundWriter): training goes on meanwhile. `state` None (an epoch that train.py's --save_every
    skips): the row only, after the writes in flight; a run resumed from an earlier checkpoint drops it (restore_log)
    and trains the epoch again."""
    run.last_row = row = dict(run.last_row, **stamp(run))
    state = state and dict(state, epoch=epoch + 1, step=0, log_row=row)
    if run.is_main:
        def write(state):
            for path in (*also, run.out / 'checkpoint-last.pth') if state else ():
                save_checkpoint(state, path)
            with open(run.out / 'log.jsonl', 'a') as f:
                f.write(json.dumps(row) + '\n')
        writer.submit(write, state)
        tqdm.write(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
    runtime.barrier()


class BackgroundWriter:
    """Epoch-end checkpoints off the critical path: the state is copied to host memory (the copy is the only wait:
    a GPU-to-host transfer, or a memory copy on a CPU), then a thread writes and fsyncs the files while training
    goes on. One write at a time: the next save, a signal's save and the end of the run wait for the one in
    flight, and an error in it (a full disk) ends the run there, in its one line. The previous checkpoint stays
    intact until the new one is complete (save_checkpoint's rename); a kill mid-write leaves the previous one."""

    def __init__(self):
        self.thread, self.error = None, None

    def submit(self, write, state):
        self.wait()
        snapshot = host_copy(state)
        self.thread = threading.Thread(target=self.run, args=(write, snapshot), daemon=True)
        self.thread.start()

    def run(self, write, snapshot):
        try:
            write(snapshot)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread at its next wait
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


writer = BackgroundWriter()


def host_copy(value):
    """A copy of a checkpoint's state whose tensors live in host memory and share nothing with the training's."""
    if isinstance(value, torch.Tensor):
        return value.detach().to('cpu', copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value
