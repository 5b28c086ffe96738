"""
How images reach the device, for every method: the data sets (CIFAR, or an ImageFolder that skips unreadable files),
the resumable distributed sampler and each image's own augmentation seeds, and the three input pipelines of
train.py: loader workers that decode and augment (the default), workers that only read bytes with decoding and
augmentation on the device (--decode_on_device), and a small data set decoded once onto the device (--gpu_data).
"""

import bisect
import hashlib
import io
import itertools
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms

import device_augment
import runtime


def pretrain_transform(img_size):
    """MAE §A.1: RandomResizedCrop (scale 0.2-1, bicubic) and horizontal flip are the only augmentations. Loader
    workers stop at uint8 tensors (a quarter of float32's bytes to ship and pin); normalize_on_device finishes."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor()])


class NormalizedOnDevice:
    """A loader of uint8 batches -> float batches on the device, normalised there: ToTensor's /255 and Normalize's
    (x - mean) / std, the same operations in the same order, so the values are those of the float pipeline."""

    def __init__(self, loader, device):
        self.loader, self.device, (self.mean, self.std) = loader, device, imagenet_mean_std(device)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)  # now, not at the first batch: the caller decides what RNG state it sees
        return (self.normalize(imgs, labels) for imgs, labels in batches)

    def normalize(self, imgs, labels):
        imgs = imgs.to(self.device, non_blocking=True).float().div_(255)
        return imgs.sub_(self.mean).div_(self.std), labels.to(self.device, non_blocking=True)


def imagenet_mean_std(device):  # (1, 3, 1, 1) tensors on the device, to normalise batches there
    return [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]


def eval_transform(img_size):
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def load_rgb(path):
    """An image file (or file-like object) as 8-bit RGB. PIL's convert('RGB') clips 16-bit greyscale (modes I;16 and
    I) to white: scale those to 8 bits first."""
    if isinstance(path, (str, os.PathLike)):
        refuse_irregular(path)
    with Image.open(path) as img:
        if img.mode.startswith('I'):
            img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
        return img.convert('RGB')


# An image that cannot be decoded, whatever the decoder raised: unidentified or truncated (OSError), malformed
# (SyntaxError), a decompression bomb (DecompressionBombError, beyond twice Image.MAX_IMAGE_PIXELS), a PNG text chunk
# or a PPM maxval beyond what PIL takes (ValueError), ... Only the decoding is guarded: an augmentation that fails is
# a bug to report, not a file to skip.
UNREADABLE = Exception
NO_BOX = (0, 0, 0, 0, 0)  # the crop box of a file whose header cannot be read (--decode_on_device)

# File names that are image formats PIL can open (.jpg, .png, .gif, .jfif, .webp, .tif, ...), lower case.
IMAGE_EXTENSIONS = frozenset(ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN)
# What operating systems, NAS boxes and archivers add to folders, never a class or an image: hidden names (macOS
# .DS_Store and ._ files, .Trash) and these folders. Only these: a class may well be called __background__ or #2.
NOT_DATA_FOLDERS = frozenset({'@eaDir', '__MACOSX', '#recycle', '#snapshot', '$RECYCLE.BIN', 'System Volume Information',
                              'lost+found'})


def is_data_name(name):
    return not name.startswith('.') and name not in NOT_DATA_FOLDERS


def is_image_file(path):
    """An image of the data set by its name: an extension PIL opens, not an operating system's hidden file. (Whether
    it is a regular file is asked when it is read, refuse_irregular: a stat per file here would cost minutes on a
    network file system.)"""
    name = os.path.basename(path)
    return is_data_name(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def refuse_irregular(path):
    """A named pipe, a socket or a device under an image's name would block its reader (through Ctrl-C) or stream
    forever: it is an unreadable file."""
    if not os.path.isfile(path):
        raise OSError('not a regular file (a named pipe, a socket or a device?)')


class ImageFolderSkippingBroken(datasets.ImageFolder):
    """An ImageFolder that replaces an unreadable image (corrupt, truncated, a decompression bomb, anything its
    decoder refuses) by the next readable one, with a warning naming the file: for training, where a stand-in costs
    nothing. Which files failed lives in shared memory, one flag per file, so that each is counted once per epoch
    however many times and in whichever loader worker it was tried, and the count reaches log.jsonl. Its files are
    listed once each (make_dataset); folders and files that are not data (is_data_name) are left out."""

    def __init__(self, root, transform):
        super().__init__(root, transform=transform, loader=load_rgb)
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def find_classes(self, directory):
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and is_data_name(entry.name))
        if not classes:
            raise FileNotFoundError(f'no class folders in {directory}')
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, key):
        """key: an index, or (index, seeds) from ImageSeeds: the image's augmentation then draws from its own seeds."""
        index, seeds = key if isinstance(key, tuple) else (key, None)
        with runtime.seeded(*seeds) if seeds is not None else nullcontext():
            return self.first_readable(index)

    def first_readable(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            image = self.decoded(i)
            if image is not None:
                return self.transform(image) if self.transform else image, self.targets[i]
        raise NoReadableImage(f'no readable image in {self.root}: every file failed to decode')

    def decoded(self, index):
        """The image file `index` decoded, or None when it cannot be (counted and reported once)."""
        if self.unreadable[index]:  # known since the epoch began
            return None
        try:
            return self.loader(self.samples[index][0])
        except UNREADABLE as e:
            self.skip(index, e)
            return None

    def skip(self, index, error):
        self.unreadable[index] = True
        # on a line of its own, not glued to the progress bar's
        print(f'\nwarning: skipping unreadable image {self.samples[index][0]} ({type(error).__name__}: '
              f'{" ".join(str(error).split())[:200]})', file=sys.stderr)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """Every image file (is_image_file) of every class folder, in torchvision's order, symbolic links followed;
        a folder or a file reached a second time, by a link that loops or that shows images again under another
        class or name, is refused in one line: its images would count twice, or under another class's label. Files
        that are no image PIL opens are left out, and counted in one note by their extensions."""
        reached, samples, linked, empty, others = {os.path.realpath(directory): directory}, [], [], [], {}
        for name, label in sorted(class_to_idx.items()):
            listed = len(samples)
            for folder, subfolders, files in os.walk(os.path.join(directory, name), followlinks=True):
                refuse_reached_twice(folder, os.path.realpath(folder), reached, directory)
                subfolders[:] = sorted(sub for sub in subfolders if is_data_name(sub))
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    if not is_image_file(path):
                        kind = os.path.splitext(file)[1].lower() or file
                        others[kind] = others.get(kind, 0) + is_data_name(file)
                        continue
                    linked += [path] if os.path.islink(path) else []
                    samples.append((path, label))
            empty += [name] if len(samples) == listed else []
        for path in linked:  # a linked file is an alias when its target is listed too, by another link or its folder
            target = os.path.realpath(path)
            refuse_reached_twice(path, os.path.dirname(target) if os.path.dirname(target) in reached else target,
                                 reached, directory)
        self.reached = set(reached)  # every folder and linked file, resolved: what refuse_shared_images compares
        others = {kind: count for kind, count in others.items() if count}  # hidden files go without a word
        if others:
            print(f'note: {directory}: {sum(others.values())} file(s) that are no image PIL opens are not used ('
                  + ', '.join(f'{kind} x{count}' for kind, count in sorted(others.items())[:8]) + ')', file=sys.stderr)
        if empty and not allow_empty:  # as torchvision says it (build_dataset reports it in one line)
            raise FileNotFoundError(f'Found no valid file for the classes {", ".join(empty)}')
        return samples


class EvaluationImageFolder(ImageFolderSkippingBroken):
    """For evaluation (validation, k-NN, frozen features): an unreadable image is left out, not replaced by another
    one, so that every number counts each readable image exactly once. Its item is None; without_unreadable, the
    loader's collate_fn, drops it, and the caller counts what it scored."""

    def first_readable(self, index):
        image = self.decoded(index)
        return None if image is None else (self.transform(image) if self.transform else image, self.targets[index])


def unreadable(dataset):
    """Which files of `dataset` could not be decoded (one flag per file; none in a built-in data set such as CIFAR)."""
    return dataset.unreadable if hasattr(dataset, 'unreadable') else torch.zeros(len(dataset), dtype=torch.bool)


def without_unreadable(batch):
    """collate_fn of an EvaluationImageFolder: the batch without its unreadable images (None when none is left)."""
    batch = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def evaluation_loader(dataset, batch_size, num_workers, rank=0, world_size=1, persistent=False):
    """Every readable image of an evaluation set (an EvaluationImageFolder) exactly once over all ranks (Shard: no
    padding), in the set's order within each rank's shard; batches without the unreadable ones (or None).
    persistent: workers started once, for a loader read every epoch."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, sampler=Shard(len(dataset), rank,
                      world_size), collate_fn=without_unreadable, worker_init_fn=runtime.ignore_stop_signals,
                      persistent_workers=persistent and num_workers > 0)


def fingerprint(dataset, with_sizes=False):
    """What a data set holds, for what must change when it does (a resumed run's identity, a features cache's key):
    its classes and its files' names relative to its root, with_sizes also each file's size and modification time
    (a file replaced in place; a stat per file, so only where one pass over the files is cheap beside the work).
    -> a SHA-256 hex digest; a built-in data set (CIFAR) is named by its class."""
    if not hasattr(dataset, 'samples'):
        return type(dataset).__name__
    digest = hashlib.sha256('\0'.join(dataset.classes).encode() + b'\1')
    for path, label in dataset.samples:
        digest.update(os.fsencode(os.path.relpath(path, dataset.root)) + f'\0{label}\0'.encode())
        if with_sizes:
            stat = os.stat(path)
            digest.update(f'{stat.st_size}\0{stat.st_mtime_ns}\0'.encode())
    return digest.hexdigest()


class Shard(torch.utils.data.Sampler):
    """Every world_size-th index from `rank` on: each image on exactly one rank, none repeated (DistributedSampler
    pads the last shard with repeats, which an evaluation would count twice). Shards differ by at most one image."""

    def __init__(self, length, rank=0, world_size=1):
        self.indices = range(rank, length, world_size)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def refuse_shared_images(train_set, val_set):
    """Images that a link shows in both splits (val/class_0 -> ../train/class_0, or one file linked into both) would
    be evaluated on what was trained on: refused in one line."""
    if not hasattr(train_set, 'reached') or val_set is None:
        return
    def within(a, b):
        return next((path for path in a.reached if path in b.reached or os.path.dirname(path) in b.reached), None)
    shared = within(val_set, train_set) or within(train_set, val_set)
    if shared:
        runtime.fail(f'--data: {shared} is reached from both {train_set.root} and {val_set.root} (a symbolic link): '
                     f'the validation images would be trained on; give each split its own images')


def refuse_reached_twice(path, real, reached, root):
    if real in reached:
        runtime.fail(f'--data: {path} in {root} leads to {reached[real]} again (a symbolic link that loops, or that '
                     f'shows images a second time under another class or name): remove the link')
    reached[real] = path


class LoaderWorkerDied(RuntimeError):
    """A loader worker process ended without a word (the kernel's out-of-memory killer, a kill): the DataLoader's
    RuntimeError, told apart from errors in the data."""


def next_batch(batches):
    try:
        return next(batches)
    except RuntimeError as e:
        if 'DataLoader worker (pid' in str(e):
            raise LoaderWorkerDied(' '.join(str(e).split())) from None
        raise


class NoReadableImage(RuntimeError):
    """Raised in a loader worker, re-raised by the DataLoader in the main process, and reported there in one line."""


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can begin an epoch part-way, for a run that a signal stopped mid-epoch."""
    start = 0  # samples of this rank's share to skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


class ImageFileBytes(ImageFolderSkippingBroken):
    """--decode_on_device: a worker reads each file's bytes and its header (the image size, for the crop box), and
    draws the image's crop box and flip; it decodes nothing."""

    def __getitem__(self, key):  # key: (index, seeds) from ImageSeeds
        index, seeds = key
        path, label = self.samples[index]
        try:
            refuse_irregular(path)
        except OSError as e:  # no bytes: the main process decodes nothing, and says nothing
            self.skip(index, e)
            return torch.zeros(0, dtype=torch.uint8), label, index, NO_BOX, seeds
        data = np.fromfile(path, dtype=np.uint8)
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                refuse_decompression_bomb(header.size)  # as PIL's decoder would: the device's does not
                box = crop_box(header, seeds)
        except Image.DecompressionBombError as e:  # no bytes: the main process decodes nothing, and says nothing
            self.skip(index, e)
            data, box = data[:0], NO_BOX
        except UNREADABLE:
            box = NO_BOX  # the main process finds the file unreadable, or draws the box from what it decodes
        return torch.from_numpy(data), label, index, box, seeds


def refuse_decompression_bomb(size):
    """PIL's limit (twice Image.MAX_IMAGE_PIXELS), for decoders that have none."""
    if Image.MAX_IMAGE_PIXELS and size[0] * size[1] > 2 * Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f'{size[0]} x {size[1]} pixels, beyond twice PIL\'s limit of '
                                           f'{Image.MAX_IMAGE_PIXELS}: a decompression bomb')


def crop_box(image, seeds):
    """pretrain_transform's RandomResizedCrop and flip draws for this image under its seeds: (top, left, height,
    width, flip). `image`: a PIL image (its header suffices) or a decoded tensor of the same size. Both draws come
    from torch's stream, as in pretrain_transform."""
    with runtime.seeded(*seeds, torch_only=True):
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
        flip = torch.rand(1) < 0.5
    return top, left, height, width, int(flip)


def as_flat_bytes(batch):
    """collate_fn for ImageFileBytes: the batch's files in one flat byte tensor and their lengths (one hand-over from
    the worker and one pin, not one per file), with labels, indices, crop boxes and seeds."""
    data, labels, indices, boxes, seeds = zip(*batch)
    return torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(labels), indices, boxes, seeds


class DecodedOnDevice(NormalizedOnDevice):
    """--decode_on_device: batches of file bytes -> augmented, normalised images on the device, in the sampler's
    order. JPEGs are decoded as one batch (torchvision.io.decode_jpeg; nvJPEG on GPUs); a file that decoder cannot
    take (PNG, CMYK or 16-bit images, a corrupt file) is decoded alone on the CPU (PIL), and one that nothing can
    read is replaced by the batch's next image and counted, as the worker pipeline does. The batch is then cropped,
    resized and flipped with the boxes its workers drew (crop_box: the worker pipeline's draws, from the same seeds;
    torchvision's tensor resize instead of PIL's, antialiased) and normalised as NormalizedOnDevice does: in a few
    batched kernels (device_augment.resized_crops) on a GPU, where launches cost the host; image by image on the
    CPU, where the batched products' arithmetic on padded images costs more. On a GPU the next batch is prepared on
    a side stream while the current one trains (prepared_ahead)."""

    def __init__(self, loader, dataset, img_size, device):
        super().__init__(loader, device)
        self.dataset, self.img_size, self.batched = dataset, img_size, device.type != 'cpu'

    def __iter__(self):
        batches = iter(self.loader)  # now: the caller decides what RNG state it sees
        return prepared_ahead((self.batch(*batch) for batch in batches), self.device)

    def batch(self, flat, lengths, labels, indices, boxes, seeds):
        images = self.decode(list(torch.split(flat, lengths.tolist())), indices)
        readable = [i for i, image in enumerate(images) if image is not None]
        if not readable:
            raise NoReadableImage(f'no readable image among {[self.dataset.samples[i][0] for i in indices]}')
        boxes = [boxes[i] if boxes[i] != NO_BOX else crop_box(images[i], seeds[i]) for i in readable]
        resize = device_augment.resized_crops if self.batched else device_augment.resized_crops_one_by_one
        crops = resize([images[i] for i in readable], boxes, self.img_size)
        stand_in = [bisect.bisect_left(readable, i) % len(readable) for i in range(len(images))]  # the next readable
        return self.normalize(crops[stand_in], labels[[readable[i] for i in stand_in]])

    def decode(self, data, indices):
        try:
            return list(torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one file the batched decoder cannot take: each alone
            return [self.decode_one(bytes_, index) for bytes_, index in zip(data, indices)]

    def decode_one(self, data, index):
        if self.dataset.unreadable[index]:  # a decompression bomb or no file, reported by the worker that read it
            return None
        try:
            return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            image = load_rgb(io.BytesIO(data.numpy().tobytes()))
            return transforms.functional.pil_to_tensor(image).to(self.device, non_blocking=True)
        except UNREADABLE as e:
            self.dataset.skip(index, e)
            return None


def prepared_ahead(batches, device):
    """The batches, each yielded once the next one is being prepared: on a GPU that preparation runs on a side
    stream, so the next batch decodes and resizes while the current one trains."""
    side = torch.cuda.Stream(device) if device.type == 'cuda' else None

    def next_batch():
        with torch.cuda.stream(side) if side else nullcontext():
            return next(batches, None)

    ready = next_batch()
    while ready is not None:
        if side:  # the step waits for this batch's kernels; the allocator keeps its memory until the step is done
            torch.cuda.current_stream(device).wait_stream(side)
            for tensor in ready:
                tensor.record_stream(torch.cuda.current_stream(device))
        upcoming = next_batch()
        yield ready
        ready = upcoming


class ImageSeeds:
    """A sampler's indices, each with the seeds of that image's augmentation in this epoch, (--seed, epoch, index):
    the draws depend on no worker, worker count or starting point, so loader workers can live across epochs
    (persistent_workers) and a resumed run still augments every image as an uninterrupted one."""

    def __init__(self, sampler, seed):
        self.sampler, self.seed = sampler, seed

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return ((index, (self.seed, self.sampler.epoch, index)) for index in self.sampler)


class GpuDataImages:
    """--gpu_data: a small data set (CIFAR, Tiny-ImageNet: images of one size) decoded once into a uint8 tensor on the
    device, augmented there batch by batch; no JPEG decoding in the loop. Iterates like the DataLoader it replaces,
    in the order of the same (resumable, distributed) sampler."""

    def __init__(self, dataset, sampler, batch_size, img_size, device, num_workers):
        decoded = DataLoader(dataset, batch_size=256, num_workers=num_workers,
                             worker_init_fn=runtime.ignore_stop_signals)
        try:
            images, labels = zip(*decoded)
        except RuntimeError as e:  # default_collate cannot stack images of different sizes
            runtime.fail(f'--gpu_data needs images of one size, as in CIFAR or Tiny-ImageNet '
                         f'({" ".join(str(e).split())})')
        self.images, self.labels = torch.cat(images).to(device), torch.cat(labels).to(device)
        self.sampler, self.batch_size, self.img_size = sampler, batch_size, img_size
        self.mean, self.std = imagenet_mean_std(device)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        """The epoch's order goes to the device once, here, at the start of the epoch; the batches follow lazily."""
        ids = torch.tensor(list(self.sampler), device=self.images.device)
        starts = range(0, len(ids) - self.batch_size + 1, self.batch_size)
        return (self.batch(ids[start:start + self.batch_size]) for start in starts)

    def batch(self, ids):
        images = device_augment.random_resized_crop_flip(self.images[ids], self.img_size, self.mean, self.std)
        return images, self.labels[ids]


def build_dataset(args, split, transform, folder_class=None):
    """The `split` ('train' or 'val') of --data, or None when a folder has no such split. Images load as RGB
    (torchvision's default loader converts greyscale JPEGs)."""
    if args.data in ('cifar10', 'cifar100'):
        cifar = datasets.CIFAR10 if args.data == 'cifar10' else datasets.CIFAR100
        try:
            return cifar(args.data_dir, train=split == 'train', transform=transform, download=True)
        except OSError as e:  # URLError is an OSError: no network, or the server refused
            runtime.fail(f'could not download {args.data} into {args.data_dir} ({e}). Without a network, extract the '
                         f'python version of the data set (https://www.cs.toronto.edu/~kriz/cifar.html) so that '
                         f'{Path(args.data_dir) / cifar.base_folder} holds its batches, or pass --data FOLDER')
    root = Path(args.data)
    if not root.is_dir():
        runtime.fail(f'--data {root}: no such folder (expected cifar10, cifar100, or an ImageFolder root)')
    folders = split_folders(root)
    if split not in folders:
        if split != 'train':
            return None
        if folders:
            runtime.fail(f'--data {root} holds {"/, ".join(path.name for path in folders.values())}/ but no train/ '
                         f'(or training/): training on the validation images would make every later evaluation '
                         f'meaningless; add train/')
    if not folders and split_of(root.resolve().name) == 'val':
        runtime.fail(f'--data {root} is a validation split: training on it would make every later evaluation '
                     f'meaningless; give the folder that holds train/ and val/')
    folder = folders.get(split, root)  # no split folders: a plain folder of class sub-folders, for training
    dataset_class = folder_class or (ImageFolderSkippingBroken if split == 'train' else EvaluationImageFolder)
    try:
        return dataset_class(folder, transform=transform)
    except (FileNotFoundError, OSError) as e:
        runtime.fail(f'--data {root}: no images found in {folder} ({e})')


# The folder names that mean a split of a data set, in any case (train/, Train/, training/; val/, Validation/, ...):
# a root holding one of them is a root of splits, never a folder whose classes are all trained on.
SPLIT_NAMES = {'train': ('train', 'training'), 'val': ('val', 'valid', 'validation')}


def split_of(name):
    """The split a folder's name means, read as a user writes it: any case, digits and punctuation aside ('Train',
    'train2017', 'Val.', 'validation ') -> 'train', 'val' or None."""
    letters = re.sub('[^a-z]', '', name.lower())
    return next((split for split, names in SPLIT_NAMES.items() if letters in names), None)


def split_folders(root):
    """{'train': folder, 'val': folder} of the split folders under root (none: root is a folder of classes); two
    folders of one split (train/ and Training/) are refused, as either could be meant."""
    folders = {}
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        split = split_of(entry.name)
        if split and entry.is_dir():
            if split in folders:
                runtime.fail(f'--data {root} holds both {folders[split].name}/ and {entry.name}/ as its {split} '
                             f'split: keep one')
            folders[split] = Path(entry.path)
    return folders


@contextmanager
def loader_errors_in_one_line():
    """An error in a loader worker (a data set without one readable image, an augmentation that fails on some image)
    reaches the main process as the DataLoader's account of the worker's traceback: say it in one line, its last."""
    try:
        yield
    except Exception as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if isinstance(e, NoReadableImage):  # in the main process, or from a worker
            runtime.fail(last.removeprefix('NoReadableImage: '))
        if isinstance(e, LoaderWorkerDied) or 'DataLoader worker (pid' in str(e):
            runtime.fail(f'a data loader worker died ({last}): out of memory, or killed? The last checkpoint is '
                         f'intact and the same command continues from it (fewer --num_workers, or a smaller '
                         f'--batch_size, if memory ran out)')
        if 'in DataLoader worker process' not in str(e):
            raise
        runtime.fail(f'a data loader worker failed: {last}; check the data and the augmentation flags (with '
                     f'--num_workers 0 the same code runs in the main process, where a debugger can reach it)')


@dataclass
class TrainingImages:
    """What a pre-training loop draws its batches from."""
    dataset: object  # the training set (an ImageFolderSkippingBroken counts the unreadable files it replaced)
    vis_dataset: object  # the same images unaugmented, for the reconstruction figures
    sampler: ResumableSampler  # this rank's share, in an order that set_epoch and .start position
    loader: object  # iterates (images, labels) on the device, normalised and augmented
    steps_per_epoch: int  # optimizer steps: batches / --accum_iter
    batch_size: int  # images per batch and process (--batch_size)

    def start_epoch(self, epoch, first_batch, decoded_once=False):
        """The sampler at the epoch's order, from its first_batch-th batch on; the count of unreadable files at
        zero, as it is counted per epoch (unless --gpu_data decoded the images once: its stand-ins stay)."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = first_batch * self.batch_size
        if isinstance(self.dataset, ImageFolderSkippingBroken) and not decoded_once:
            self.dataset.unreadable.zero_()


def build_training_images(args, rank, world_size, device):
    """The training images in the resumable, distributed sampler's order, through the pipeline the flags choose:
    workers that decode and augment (default), --decode_on_device or --gpu_data."""
    if rank != 0:  # rank 0 downloads first, so that ranks do not race on the same files
        runtime.barrier()
    dataset = build_dataset(args, 'train', pretrain_transform(args.img_size),
                            ImageFileBytes if args.decode_on_device else ImageFolderSkippingBroken)
    vis_dataset = build_dataset(args, 'train', eval_transform(args.img_size))
    refuse_shared_images(dataset, build_dataset(args, 'val', None))
    if rank == 0:
        runtime.barrier()
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    if args.gpu_data:
        dataset.transform = transforms.PILToTensor()  # decoded once, augmented on the device
        loader = GpuDataImages(dataset, sampler, args.batch_size, args.img_size, device, args.num_workers)
    else:  # workers started once, kept across epochs; uint8 batches, pinned on GPUs, normalised on the device
        workers = DataLoader(dataset, batch_size=args.batch_size, sampler=ImageSeeds(sampler, args.seed),
                             num_workers=args.num_workers, persistent_workers=args.num_workers > 0, drop_last=True,
                             pin_memory=device.type == 'cuda', worker_init_fn=runtime.ignore_stop_signals,
                             collate_fn=as_flat_bytes if args.decode_on_device else None)
        loader = (DecodedOnDevice(workers, dataset, args.img_size, device) if args.decode_on_device
                  else NormalizedOnDevice(workers, device))
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        runtime.fail(f'{len(dataset)} images are too few for {world_size} process(es) x --batch_size '
                     f'{args.batch_size} x --accum_iter {args.accum_iter}')
    return TrainingImages(dataset, vis_dataset, sampler, loader, steps_per_epoch, args.batch_size)
