"""
What no paper asks for but a run on a laptop or on 8 GPUs needs, shared by train.py and finetune.py: bad input in
one line, the process group and its collectives, RNG streams and a rank's position inside an epoch, stopping on a
signal (and the vote that makes every rank stop at the same step), the output folder's lock and a run's identity,
and checkpoint files written so that a kill at any moment leaves the previous one intact.
"""

import argparse
import fcntl
import json
import os
import random
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from tqdm import tqdm


def fail(message):
    """Bad input ends the run with one line naming the problem, not a traceback."""
    raise SystemExit(f'error: {" ".join(str(message).split())}')


@dataclass
class Run:
    """What every run of train.py or finetune.py holds first: its flags, its place among the processes torchrun
    started (0 of 1 alone), its device and its precision (--precision)."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    autocast: object

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def out(self):
        return Path(self.args.output_dir)


def autocast_for(args, device):
    """--precision bf16: autocast to bfloat16 (no loss scaler needed, unlike fp16, which NaNs in long MAE runs), on
    GPUs and, for tests and CPUs with bf16 matrix units, on CPUs alike; fp32: no autocast."""
    if args.precision is None:
        args.precision = 'bf16' if device.type == 'cuda' else 'fp32'
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == 'bf16' else nullcontext()


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


def broadcast_parameters(module):
    """Give every rank rank 0's weights: DDP does it once when it wraps a model, not after a re-initialisation."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


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


def gather_positions(device, **sums):
    """Where every rank stands in an epoch that a signal interrupts: each rank's own RNG states (its masks, drop-path
    and crops differ from the other ranks') and partial loss sums, gathered in rank order for the checkpoint."""
    sums = {name: {k: v.cpu() for k, v in value.items()} if isinstance(value, dict) else value.cpu()
            for name, value in sums.items()}
    return gather_from_ranks(dict(rng_state=rng_states(device), **sums))


def own_position(checkpoint, rank, world_size, path):
    """This rank's part of gather_positions() in a checkpoint. An epoch cut at a step continues only on as many
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


def load_weights_file(path):
    """A checkpoint or state dict as saved by torch.save (loaded without running pickled code), or a .safetensors
    file (timm's and the Hugging Face hub's format)."""
    if str(path).endswith('.safetensors'):
        return safetensors.torch.load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):  # official MAE checkpoints pickle their args
        return torch.load(path, map_location='cpu', weights_only=True)


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
        checkpoint = load_weights_file(path)
    except Exception as e:  # truncated, foreign or missing: one line, whatever torch raised
        fail(f'cannot read checkpoint {path}: {" ".join(str(e).split())[:300]}')
    missing = [key for key in required_keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        fail(f'{path} is not a checkpoint of this script (it has no {", ".join(missing)})')
    return checkpoint


def read_resumed(args, required):
    """The checkpoint a run continues: --resume, else OUTPUT_DIR/checkpoint-last.pth when there is one -> (its path,
    the checkpoint or None). `required`: the keys besides 'args' that the script's checkpoints hold."""
    path = Path(args.resume) if args.resume else Path(args.output_dir) / 'checkpoint-last.pth'
    return path, load_checkpoint(path, ('args', *required)) if args.resume or path.exists() else None


def restore_training(checkpoint, path, model, optimizer):
    """The weights and the optimizer's state (moments, step counts) of a resumed checkpoint. The optimizer's
    hyperparameters (weight decay, betas, eps, lr scales) stay this run's, as its flags set them: load_state_dict
    would bring back the saved ones, silently undoing a changed schedule flag that flags.OnResume announced."""
    load_state(model, checkpoint['model'], f'{path} ({checkpoint["args"].get("method")} '
                                           f'{checkpoint["args"].get("model")})')
    settings = [{key: value for key, value in group.items() if key != 'params'} for group in optimizer.param_groups]
    load_state(optimizer, checkpoint['optimizer'], f'the optimizer state in {path}')
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


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




# -----------------------------------------------------------------------------------------------------------------
# The epoch boundary, as train.py and finetune.py both cross it

def epoch_start(checkpoint, epoch, start_epoch, rank, world_size, path):
    """Where an epoch begins -> (0, None), or in the epoch a signal interrupted (the step it stopped after, this rank's
    saved position: its RNG states and partial loss sums)."""
    if not (checkpoint and checkpoint['step'] and epoch == start_epoch):
        return 0, None
    return checkpoint['step'], own_position(checkpoint, rank, world_size, path)


def save_mid_epoch(state, epoch, steps_done, out, is_main, device, **sums):
    """A signal stops the run mid-epoch: `state` (weights, optimizer, flags) and every rank's exact position (RNG
    states, partial sums) go into the checkpoint, which rank 0 writes; the same command continues from it."""
    positions = gather_positions(device, **sums)
    if is_main:
        save_checkpoint(dict(state, epoch=epoch, step=steps_done, ranks=positions), out / 'checkpoint-last.pth')
        print(f'\nstopped by a signal in epoch {epoch} after step {steps_done}; the same command continues from '
              f'{out / "checkpoint-last.pth"}')
    barrier()


def save_epoch(state, row, out, is_main, also=()):
    """The end of an epoch: the checkpoint first, holding its log row, then the row in log.jsonl, so that the log
    never shows an epoch no checkpoint covers. `also`: further files that keep this checkpoint (the best, ...)."""
    if is_main:
        for path in also:
            save_checkpoint(state, path)
        save_checkpoint(state, out / 'checkpoint-last.pth')
        with open(out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        tqdm.write(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
    barrier()
