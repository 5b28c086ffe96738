"""
What no paper asks for but a run on a laptop or on 8 GPUs needs, shared by train.py and finetune.py: bad input in
one line, the process group and its collectives, RNG streams, stopping on a signal (the one stop path of every phase,
and the vote that makes every rank of a training loop stop at the same step), and the output folder's lock.
Checkpoint files and the epoch boundary are in checkpoints.py; flags, their ranges and their resume classes in
flags.py.
"""

import argparse
import datetime
import fcntl
import fnmatch
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def fail(message):
    """Bad input ends the run with one line naming the problem, not a traceback."""
    raise SystemExit(f'error: {" ".join(str(message).split())}')


def script(main):
    """A script's entry: main() run, and the one line that ended it (fail's) written whole, in one write: Python
    writes the message and its newline apart, and the ranks of torchrun, sharing a terminal, ran them together."""
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        sys.stderr.write(e.code + '\n')
        sys.stderr.flush()
        raise SystemExit(1) from None


@dataclass
class Run:
    """What every run of train.py or finetune.py holds first: its flags, its place among the processes torchrun
    started (0 of 1 alone), its device and its precision (--precision); then the checkpoint it continues, if any
    (checkpoints.read_resumed), and the epoch and log row it has reached."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    autocast: object
    resume: Path = None  # --resume, or OUTPUT_DIR/checkpoint-last.pth
    ckpt: dict | None = None  # what was resumed: its position (its weights are freed once restored)
    start_epoch: int = 0
    last_row: dict | None = None  # the log's last row, which every checkpoint holds
    begun_from: list = field(default_factory=list)  # the --resume files its checkpoints descend from
    identity: dict = None  # what a checkpoint must match to be continued (flags.OnResume.identity, and the data's)
    started: float = field(default_factory=time.time)  # this process's start, for the log's elapsed seconds

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def out(self):
        return Path(self.args.output_dir)


def write_flags(run, **resolved):
    """OUTPUT_DIR/args.json: the flags this (re)start runs with, and what they resolve to on this machine (effective
    batch, lr, processes), readable without loading a checkpoint. Rank 0 writes it at every start."""
    if run.is_main:
        record = dict(vars(run.args), world_size=run.world_size, **resolved)
        (run.out / 'args.json').write_text(json.dumps(record, indent=1, default=str) + '\n')


def in_a_terminal():
    """Whether progress bars can redraw in place: outside a terminal (a batch job's log file) their carriage
    returns would leave a fragment per update, so the loops print one line per log point instead."""
    return sys.stderr.isatty()


def autocast_for(args, device):
    """--precision bf16: autocast to bfloat16 (no loss scaler needed, unlike fp16, which NaNs in long MAE runs), on
    GPUs and, for tests and CPUs with bf16 matrix units, on CPUs alike; fp32: no autocast."""
    if args.precision is None:
        args.precision = 'bf16' if device.type == 'cuda' else 'fp32'
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == 'bf16' else nullcontext()


# How long a process waits for the others of a group to come (they start together: minutes are plenty), and how long
# any collective waits for a rank that does not answer (a lost node): the longest a healthy rank keeps the others
# waiting is rank 0 writing a checkpoint (seconds to a minute for ViT-H), not the 30 minutes gloo waits by default.
SETUP_TIMEOUT = datetime.timedelta(minutes=5)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def init_distributed(device_name):
    """-> (rank, world_size, device). NCCL for GPUs, gloo for CPUs. A process that RANK (torchrun's) or SLURM's
    variables (srun without torchrun: from_slurm) name part of a group waits for its peers at most SETUP_TIMEOUT, and
    stops at a signal while it waits; a collective then waits at most COLLECTIVE_TIMEOUT for a rank that is gone."""
    from_slurm()
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(device_name)
    launcher_rank()
    missing = [name for name in ('WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_RANK') if not os.environ.get(name)]
    if missing:
        fail(f'RANK is set in the environment but {", ".join(missing)} not: start the processes with torchrun, or '
             f'unset RANK (a leftover of another job?) to run one process')
    address = f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}'
    try:  # the store blocks in C++, where Python runs no signal handler: wait for it in a thread
        store, rank, world_size = wait_interruptibly(lambda: next(dist.rendezvous('env://', timeout=SETUP_TIMEOUT)))
    except (RuntimeError, ValueError) as e:  # a time-out, a bad number, an address that does not resolve
        fail(f'rank {os.environ["RANK"]} of WORLD_SIZE {os.environ["WORLD_SIZE"]} could not meet its peers at '
             f'{address} within {SETUP_TIMEOUT.seconds} s ({" ".join(str(e).split())[:200]}): start every process '
             f'(torchrun does), or unset RANK to run one')
    # No per-attempt prefix on the store: torchrun's restart count is per node (pytorch/pytorch#135712), so after one
    # node restarts its worker the attempts' prefixes differ between nodes and the workers never meet. A fresh store
    # per rendezvous round comes from the launcher instead: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/reliability.md).
    if device_name.startswith('cuda'):
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', store=store, rank=rank, world_size=world_size, device_id=device,
                                timeout=COLLECTIVE_TIMEOUT)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo', store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return rank, world_size, device


def from_slurm():
    """`srun python train.py` (no torchrun) on a SLURM cluster: torch.distributed's variables from SLURM's, where
    RANK is unset and srun started several tasks of this step (SLURM_STEP_NUM_TASKS: the batch script itself, which
    also sees SLURM_NTASKS and SLURM_PROCID, is one process): RANK, WORLD_SIZE and LOCAL_RANK from SLURM_PROCID,
    SLURM_STEP_NUM_TASKS and SLURM_LOCALID; MASTER_ADDR, unless given, the first host of SLURM_JOB_NODELIST;
    MASTER_PORT, unless given, one per job (29500 + the job id's last three digits). Written here because torch
    reads none of them (timm, open_clip and the official MAE map them alike)."""
    tasks = os.environ.get('SLURM_STEP_NUM_TASKS', '1')
    if 'RANK' in os.environ or not tasks.isdigit() or int(tasks) <= 1 or 'SLURM_PROCID' not in os.environ:
        return
    nodes = os.environ.get('SLURM_JOB_NODELIST') or os.environ.get('SLURM_NODELIST', '')
    os.environ.update(RANK=os.environ['SLURM_PROCID'], WORLD_SIZE=tasks,
                      LOCAL_RANK=os.environ.get('SLURM_LOCALID', '0'),
                      LOCAL_WORLD_SIZE=os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0])
    os.environ.setdefault('MASTER_ADDR', first_host(nodes))
    os.environ.setdefault('MASTER_PORT', str(29500 + int(os.environ.get('SLURM_JOB_ID', '0')) % 1000))


def first_host(nodelist):
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03' (what `scontrol show hostnames` prints
    first, without scontrol)."""
    head = nodelist.split(',')[0] if '[' not in nodelist.split(',')[0] else nodelist.split(']')[0]
    if '[' not in head:
        return head or 'localhost'
    prefix, ranges = head.split('[', 1)
    return prefix + ranges.split(',')[0].split('-')[0]


def launcher_rank():
    """This process's RANK as a launcher set it (torchrun, or srun: from_slurm; 0 when unset); a value that is no
    rank is refused in one line."""
    from_slurm()
    text = os.environ.get('RANK', '0')
    if not text.strip().isdigit():
        fail(f'RANK={text!r} in the environment is no process rank: start the processes with torchrun, or unset RANK '
             f'to run one')
    return int(text)


def wait_interruptibly(call):
    """call() in a helper thread while this (the main) thread waits for it: Python runs signal handlers only in the
    main thread and only between its own steps, so a call that blocks in C++ would otherwise ignore Ctrl-C."""
    outcome = {}

    def target():
        try:
            outcome['value'] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            outcome['error'] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if 'error' in outcome:
        raise outcome['error']
    return outcome['value']


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


def seed_everything(*keys):
    """Seed torch, numpy (timm's Mixup) and Python's random (timm's RandAugment) from a tuple of ints: every (seed,
    epoch, rank) gets its own streams, so a resumed run draws what an uninterrupted one would."""
    seed = hash(keys) % 2 ** 32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextmanager
def seeded(*keys, torch_only=False):
    """Draws inside come from the host streams seed_everything(*keys) starts; the states outside are left as they were
    (a loader without worker processes augments in the main process, whose streams draw the masks). Only the CPU
    generator is seeded: torch.manual_seed would also re-seed every accelerator's, from which a GPU run draws its
    masks (each image's seed would then pick the next step's masks), and costs a tenth of a millisecond per image.
    torch_only: torch's stream alone, for draws that use nothing else (data.crop_box: numpy's and Python's seeding
    would cost another 0.13 ms per image)."""
    seed = hash(keys) % 2 ** 32
    state = torch.get_rng_state()
    others = None if torch_only else (random.getstate(), np.random.get_state())
    torch.default_generator.manual_seed(seed)
    if not torch_only:
        np.random.seed(seed)
        random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if others:
            random.setstate(others[0])
            np.random.set_state(others[1])


stop_requested = False  # by a signal, or reproduce.py's deadline: the training loops read it after each step
signals_deferred = False  # inside deferring_signals: a signal only sets stop_requested


stop_reached = threading.Event()  # a signal's handler ran: the main thread is not blocked (end_when_stuck stands down)


def request_stop():
    global stop_requested
    stop_requested = True


# Every signal that asks a run to end, as schedulers and terminals send them: SIGTERM (pre-emption, torchrun),
# SIGINT (Ctrl-C), SIGHUP (the terminal or ssh session went away), SIGUSR1 and SIGUSR2 (a cluster's warning before its
# time limit: SLURM's --signal, LSF, PBS), SIGXCPU (a CPU-time limit: ulimit -t, Grid Engine's s_cpu). SIGKILL cannot
# be caught; SIGQUIT is left to ask for a core dump.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)


def on_signal(signum, frame):
    """Any of STOP_SIGNALS. In a training loop they ask it to stop after the current step, to
    checkpoint its exact position and exit 0 (deferring_signals); in every other phase (set-up, FLOP counting, feature
    extraction, k-NN, the linear classifier, evaluation, reproduce.py between runs) there is no position to save,
    and the run ends now, in one line."""
    request_stop()
    stop_reached.set()
    if not signals_deferred:
        fail(f'stopped by {signal.Signals(signum).name} where there is nothing to save; the last checkpoint, if any, '
             f'is intact: the same command continues from it')


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


# After a stop signal, how long the main thread may go without running its handler (on_signal) before it is taken to
# be blocked in a collective that waits for a rank that is gone: there, in C++, Python runs no handler, for up to
# COLLECTIVE_TIMEOUT. Within the 30 s after which torchrun and SLURM (its default KillWait) kill what their SIGTERM did
# not end. A healthy main thread runs the handler within one operation, and then stops as on_signal says.
STOP_GRACE_SECONDS = 20.0
WATCH_ENDS = bytes(1)  # no signal's number: what stop_on_signals writes to end the watch (forked loader workers
# hold the pipe's write end too, so its closing is no end of file)


def end_when_stuck(wakeups):
    """The watch of a helper thread (stop_on_signals): signal.set_wakeup_fd writes the number of every signal to the
    pipe `wakeups`, even while the main thread is blocked in C++. A stop signal whose handler the main thread has not
    run within STOP_GRACE_SECONDS (stop_reached) finds it blocked in a collective that waits for a rank that is gone:
    the process ends here, in one line, and the last checkpoint stands."""
    while (received := os.read(wakeups, 1)) != WATCH_ENDS:
        if received[0] in STOP_SIGNALS and not stop_reached.wait(STOP_GRACE_SECONDS):
            rank = f'rank {dist.get_rank()}' if dist.is_initialized() else 'the run'
            print(f'error: {rank} did not stop within {STOP_GRACE_SECONDS:.0f} s of {signal.Signals(received[0]).name}: '
                  f'it waits for another rank that ended on an error of its own (its line says which), or is gone '
                  f'or frozen (a lost node?); ended without a save: the last checkpoint, if any, stands and the same '
                  f'command continues from it', file=sys.__stderr__, flush=True)
            os._exit(1)


@contextmanager
def lost_ranks_in_one_line():
    """A collective whose peer died (gloo: the connection closed; NCCL: a DistError) or did not answer within
    COLLECTIVE_TIMEOUT (a frozen node) ends the run in one line instead of a traceback from inside torch."""
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized() or not (isinstance(e, dist.DistError) or 'gloo' in str(e)):
            raise
        what = re.sub(r'^\[[^\]]*\]\s*', '', ' '.join(str(e).split())).split('. ')[0][:160]  # no source location
        fail(f'rank {dist.get_rank()} lost another rank ({what}): a rank ended on an error of its own (its line '
             f'says which), or a process or node died or stopped answering; the last checkpoint, if any, stands: '
             f'once the cause is fixed and every node is back, the same command continues from it')


@contextmanager
def stop_on_signals():
    """The one stop path of a script: STOP_SIGNALS go to on_signal while it runs (and to end_when_stuck's watch, for
    a rank blocked in a collective), the previous handlers come back afterwards, and loader workers left behind end
    with it (multiprocessing's exit hook would wait forever for
    workers that an error left alive: it asks them with SIGTERM, which they ignore so that the main process can
    checkpoint first)."""
    global stop_requested
    stop_requested = False
    stop_reached.clear()
    handlers = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    wakeups, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    previous_wakeup = signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
    watch = threading.Thread(target=end_when_stuck, args=(wakeups,), daemon=True)
    watch.start()
    streams = sys.stdout, sys.stderr
    # a stream closed before the start (`2>&-`) is None in Python: its output goes nowhere
    sys.stdout, sys.stderr = (StopWhenClosed(stream or open(os.devnull, 'w')) for stream in streams)
    try:
        yield
    finally:
        stop_reached.set()  # the script has come to its end: the watch stands down
        for sig in STOP_SIGNALS:  # its work is saved: a signal now would only turn its exit into a failure
            signal.signal(sig, signal.SIG_IGN)
        sys.stdout, sys.stderr = streams
        signal.set_wakeup_fd(previous_wakeup)
        os.write(wakeup, WATCH_ENDS)
        watch.join()
        os.close(wakeup)
        os.close(wakeups)
        if dist.is_initialized():
            dist.destroy_process_group()
        stop_loader_workers()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class StopWhenClosed:
    """sys.stdout or sys.stderr, for a reader that may go away (`train.py | head`, a pipe to a log reader that ends):
    its closing asks the run to stop as a signal does (after the step, with its position saved); what is written
    afterwards goes to /dev/null instead of raising BrokenPipeError out of a print."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError:  # a closed pipe, a full disk under a redirection (> /dev/full), a closed descriptor
            self.reader_gone()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError:
            self.reader_gone()

    def reader_gone(self):
        try:  # the buffer's rest, and all later output
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            self.stream = open(os.devnull, 'w')
        request_stop()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def stop_loader_workers():
    """Loader workers (daemonic children) still alive when a run ends, persistent ones or those of a loader that an
    error left behind, end now: killed, since they ignore SIGTERM, and reaped while torch's SIGCHLD handler, which
    would report the kill as a worker's failure, is set aside."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in workers:
            worker.kill()
            worker.join()
        signal.signal(signal.SIGCHLD, torch_handler)


def ignore_stop_signals(worker_id):
    """worker_init_fn: loader workers leave the stop signals to the main process. A signal sent to the whole process
    group (Ctrl-C in a terminal, a scheduler pre-empting a job) would otherwise kill them first, and the main process
    would die of their deaths before it checkpoints; it stops them itself when it exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def deferring_signals():
    """Inside, a signal only sets stop_requested. A training loop reads it after each step (StopVote) and saves its
    position; the wait for a run's last checkpoint write finishes that write (cut short by the signal's exit, the
    save would be lost with the thread writing it)."""
    global signals_deferred
    signals_deferred = True
    try:
        yield
    finally:
        signals_deferred = False


# The files a run writes into its --output_dir (train.py, finetune.py, reproduce.py's clock): its own, so none of
# them may be a symbolic link (a rewrite would land outside the folder) or something other than a file (a named
# pipe would block the run), and an export never replaces one.
RUN_FILES = ('checkpoint-*.pth', 'teacher-stage*.pth', 'log.jsonl', 'steps.jsonl', 'args.json', 'features.pt',
             'vis-epoch*.png', 'wall_clock.json', '.lock')


def is_run_file(name):
    return any(fnmatch.fnmatch(name, pattern) for pattern in RUN_FILES)


@contextmanager
def exclusive_output_dir(path):
    """One run per output folder. Every rank checks that the folder can be written (so that all of them stop with the
    message); rank 0 holds an advisory lock on OUTPUT_DIR/.lock while the run lives, which the OS releases if the
    process dies, so a second run on the folder is refused instead of interleaving its log and checkpoints. A run
    that writes nothing there (refused, or stopped before its first write) leaves no folder it made behind."""
    path = Path(path)
    made = []  # the folders this run makes, deepest first; only rank 0 makes them, so it knows which are its own
    try:
        try:
            if launcher_rank() == 0:
                make_folders(path, made)
            tempfile.TemporaryFile(dir=nearest_folder(path)).close()  # the others: where rank 0 makes it
        except OSError as e:
            fail(f'--output_dir {path} is not writable ({e.strerror})')
        for entry in os.scandir(path) if path.is_dir() else ():  # another rank may look before rank 0 has made it
            if is_run_file(entry.name) and (entry.is_symlink() or not entry.is_file()):
                fail(f'--output_dir {path}: {entry.name} is a symbolic link or not a regular file, and the run writes '
                     f'its own {entry.name} there: remove it, or give another --output_dir')
        if launcher_rank() != 0:
            yield
            return
        with held_lock(path, made_here=path in made):
            yield
    finally:
        for folder in made:  # only the empty ones: nothing written is ever removed
            with suppress(OSError):
                folder.rmdir()


def make_folders(path, made):
    """Makes path and the folders above it that are missing, adding each to made (deepest first). A level is judged
    when it is reached, so that 'new/../old' never counts the existing old/ as made; made is filled before each mkdir,
    so that a signal in between still leaves the list whole (a rmdir of a folder that was not made fails)."""
    for folder in reversed((path, *path.parents)):
        if folder.is_dir():
            continue
        if folder.is_symlink():
            fail(f'--output_dir {path}: {folder} is a symbolic link to {os.readlink(folder)}, which is no folder: '
                 f'make that folder, or give another --output_dir')
        if folder.exists():
            fail(f'--output_dir {path}: {folder} is a file, not a folder: give another --output_dir')
        made.insert(0, folder)
        try:
            folder.mkdir()
        except FileExistsError:  # another process made it meanwhile: not this run's
            made.remove(folder)


def is_still_at(file, path):
    """Whether the open file is the one that path names now."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def nearest_folder(path):
    """path, or the nearest folder above it that exists."""
    return next(folder for folder in (path, *path.parents) if folder.is_dir())


@contextmanager
def held_lock(path, made_here):
    """OUTPUT_DIR/.lock, locked by this process with its pid written in it, or the run refused: the folder is in use.
    In a folder made_here, a .lock that is all the run wrote is removed before the lock is let go (no other run can
    have taken the folder meanwhile)."""
    try:  # not through a symbolic link: the lock file is the run's own, and it is truncated
        descriptor = os.open(path / '.lock', os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        fail(f'--output_dir {path}: cannot open its .lock ({e.strerror}: a symbolic link, or not a file?); remove it')
    with os.fdopen(descriptor, 'r+') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            fail(f'--output_dir {path} is in use by another run ({lock.read().strip() or "unknown process"}): wait '
                 f'for it to end, or give another --output_dir')
        if not is_still_at(lock, path / '.lock'):  # a run that made the folder removed it as this one opened .lock
            fail(f'--output_dir {path} was given up by another run as this one started: start this one again')
        try:
            lock.truncate(0)
            lock.write(f'pid {os.getpid()} on {os.uname().nodename}')
            lock.flush()
            for stale in path.glob('.*.tmp'):  # a save that a kill cut short (checkpoints.save_checkpoint's temp file)
                if is_run_file(stale.name[1:-len('.tmp')].rsplit('.', 1)[0]):
                    stale.unlink()
            yield
        finally:
            if made_here and [entry.name for entry in os.scandir(path)] == ['.lock']:
                (path / '.lock').unlink()
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def out_of_memory_in_one_line():
    """An allocation beyond the device's or the host's memory (a batch, an image size or a model too large for the
    machine: values in their declared ranges can still be) ends the run in one line, not the allocator's traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        words = ' '.join(str(e).split())
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in words:
            raise
        fail(f'out of memory ({words[:160]}): lower --batch_size (--accum_iter keeps the effective batch), or take a '
             f'smaller model or image size; the last checkpoint, if any, is intact')


def check_finite(nonfinite_step, epoch, out):
    """Stop every rank when any saw a non-finite loss (tracked on the device, read here at log points)."""
    step = int(max_over_ranks(nonfinite_step))
    if step >= 0:
        fail(f'the loss became NaN or infinite in epoch {epoch} at step {step} (usually too high a learning rate for '
             f'this batch size: lower --blr, or set --clip_grad; --skip_nonfinite N skips isolated bad batches); '
             f'{last_good_checkpoint(out)}')


def last_good_checkpoint(out):
    """The end of the line of a run stopped by its numbers: where it can be taken up again, if anywhere."""
    last = Path(out) / 'checkpoint-last.pth'
    return f'the last good checkpoint is {last}' if last.is_file() else 'no checkpoint had been written yet'
