"""Shared test fixtures: a tiny generated ImageFolder and stand-in teacher files (tests never depend on data outside
the repository)."""

import pytest
import torch
from PIL import Image

import teachers


def make_image_folder(root, classes=2, per_class=8, size=40, seed=0):
    """root/{train,val}/class_k/*.jpg with random RGB images, and one greyscale JPEG per split (as in the real
    Tiny-ImageNet), so loaders are exercised on both."""
    generator = torch.Generator().manual_seed(seed)
    for split, count in (('train', per_class), ('val', max(1, per_class // 4))):
        for k in range(classes):
            folder = root / split / f'class_{k}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
                image = Image.fromarray(pixels.numpy())
                (image.convert('L') if i == 0 else image).save(folder / f'{i}.jpg')
    return root


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'))


@pytest.fixture(scope='session')
def standin(tmp_path_factory):
    """(CLIP ViT-S-16 file, DINO ViT-S/16 file): random weights in the real formats, 320 MB, so written once."""
    return teachers.save_standin_weights(tmp_path_factory.mktemp('standins'))


def for_mode(argv):
    """finetune.py flags shared by a test's cases, without the training schedule when --mode knn trains nothing
    (finetune.py refuses flags its mode does not read)."""
    argv = [str(arg) for arg in argv]
    modes = [value for flag, value in zip(argv, argv[1:]) if flag == '--mode']
    if modes[-1:] != ['knn']:
        return argv
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ('--epochs', '--warmup_epochs'):
            skip = True
        else:
            kept.append(arg)
    return kept
