"""MAE's crop and flip batched on the device (device_augment.py) against torchvision's, image by image, and the
--decode_on_device batches prepared one ahead (data.prepared_ahead)."""

import torch
from torchvision import transforms

import data
import device_augment


def images_and_boxes(count, largest, size, generator):
    """Noise images of random sizes, some smaller than the output (the crop is enlarged), each with a box drawn as
    RandomResizedCrop draws it and a flip."""
    images, boxes = [], []
    for i in range(count):
        height, width = torch.randint(size // 4, largest, (2,), generator=generator).tolist()
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        images.append(transforms.functional.gaussian_blur(image, [5, 5]) if i % 2 else image)  # photos are smooth
        top, left, crop_height, crop_width = transforms.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
        boxes.append((top, left, crop_height, crop_width, i % 3 % 2))
    return images, boxes


def test_batched_crops_are_torchvisions_antialiased_bicubic_crops(monkeypatch):
    """The same pixels as torchvision's resized_crop (BICUBIC, antialias) + flip, image by image, up to one level
    where float sums in another order round the other way; in the batch's order when the images form several groups."""
    generator = torch.Generator().manual_seed(0)
    for size, largest in ((32, 200), (64, 48)):  # shrinking mostly; enlarging every crop
        images, boxes = images_and_boxes(24, largest, size, generator)
        expected = device_augment.resized_crops_one_by_one(images, boxes, size).int()
        for group_bytes in (device_augment.GROUP_BYTES, 3 * 4 * 60 * 60):  # one group; many
            monkeypatch.setattr(device_augment, 'GROUP_BYTES', group_bytes)
            got = device_augment.resized_crops(images, boxes, size).int()
            assert got.shape == expected.shape and got.dtype == expected.dtype
            assert (got - expected).abs().max() <= 1, size
            assert (got != expected).float().mean() < 1e-3, size


def test_batched_crops_keep_fp32_precision_when_tf32_is_allowed():
    """train.py allows TF32 matmuls; on a GPU they would round the resize weights to 10 bits. resized_crops asks for
    full precision while it runs and gives back the setting it found."""
    images, boxes = images_and_boxes(4, 100, 32, torch.Generator().manual_seed(1))
    torch.set_float32_matmul_precision('high')
    try:
        seen = []
        matmul = torch.Tensor.__matmul__
        torch.Tensor.__matmul__ = lambda a, b: seen.append(torch.get_float32_matmul_precision()) or matmul(a, b)
        try:
            device_augment.resized_crops(images, boxes, 32)
        finally:
            torch.Tensor.__matmul__ = matmul
        assert seen and set(seen) == {'highest'}
        assert torch.get_float32_matmul_precision() == 'high'
    finally:
        torch.set_float32_matmul_precision('highest')


def test_decode_on_device_batches_are_the_same_batched_or_one_by_one(tmp_path):
    """DecodedOnDevice.batch with the batched resize (GPUs) and image by image (the CPU): the same normalised images,
    the corrupt file's place taken by the next image, up to one level of 255."""
    from test_train import mixed_folder
    import train
    folder = mixed_folder(tmp_path / 'data')
    args = train.get_args_parser().parse_args(['--data', str(folder), '--decode_on_device', '--img_size', '32'])
    files = data.build_dataset(args, 'train', None, data.ImageFileBytes)
    device_side = data.DecodedOnDevice(None, files, 32, torch.device('cpu'))
    batch = data.as_flat_bytes([files[i, (0, 1, i)] for i in range(len(files))])
    assert not device_side.batched  # on the CPU, image by image
    one_by_one, labels = device_side.batch(*batch)
    device_side.batched = True
    batched, batched_labels = device_side.batch(*batch)
    assert torch.equal(labels, batched_labels)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert ((batched - one_by_one) * std).abs().max() <= 1 / 255 + 1e-6


def test_prepared_ahead_prepares_the_next_batch_before_handing_out_this_one():
    prepared = []

    def batches():
        for i in range(3):
            prepared.append(i)
            yield (torch.tensor([i]),)

    handed = []
    for (batch,) in data.prepared_ahead(batches(), torch.device('cpu')):
        handed.append((int(batch), list(prepared)))
    assert handed == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
