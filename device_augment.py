"""
MAE's augmentation (§A.1: RandomResizedCrop and horizontal flip) for a whole batch on its device, in a fixed number
of kernels however many images the batch holds: on a GPU each kernel launch costs the host several microseconds,
and a per-image loop of crops and resizes costs it thousands of launches and Python calls per batch.

- random_resized_crop_flip (--gpu_data): a batch of images of one size, boxes drawn on the device.
- resized_crops (--decode_on_device): decoded images of any sizes, each with the box its loader worker drew
  (data.crop_box), resized with torchvision's antialiased bicubic as two matrix products; resized_crops_one_by_one
  is the same through torchvision, image by image (on the CPU, where launches cost nothing, the cheaper of the two).
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resized_crop


def random_resized_crop_flip(images, size, mean, std, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop + horizontal flip + normalisation with mean and std ((1, 3, 1, 1) tensors on the images'
    device) for a whole uint8 batch (B, 3, H, W) on its device: per image a box of area scale*H*W and log-uniform
    aspect ratio at a uniform position, flipped with probability 1/2, resampled bicubically through one affine grid.
    Unlike torchvision, which re-draws a box that does not fit, a box is clamped to the image. Nothing here waits for
    the device: no value comes back to the host and no tensor is made from host data."""
    B, _, H, W = images.shape
    device = images.device
    area = H * W * torch.empty(B, device=device).uniform_(*scale)
    aspect = torch.empty(B, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt().clamp(max=W), (area / aspect).sqrt().clamp(max=H)
    cx = w / 2 + torch.rand(B, device=device) * (W - w)
    cy = h / 2 + torch.rand(B, device=device) * (H - h)
    flip = torch.where(torch.rand(B, device=device) < 0.5, -1.0, 1.0)
    zero = torch.zeros(B, device=device)
    theta = torch.stack([torch.stack([w / W * flip, zero, 2 * cx / W - 1], dim=1),  # output -> input coordinates
                         torch.stack([zero, h / H, 2 * cy / H - 1], dim=1)], dim=1)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    out = F.grid_sample(images.float() / 255, grid, mode='bicubic', padding_mode='border', align_corners=False)
    return (out.clamp(0, 1) - mean) / std


# The padded float copy of a group of images stays under this many bytes: a batch of ImageNet-sized photos (about
# 500x375) is one or two groups, and one large photo does not make a batch of 256 padded to its size fill the memory.
GROUP_BYTES = 2 ** 30


def resized_crops(images, boxes, size):
    """images: decoded uint8 (3, H_i, W_i) tensors on one device; boxes: (top, left, height, width, flip) each
    -> (B, 3, size, size) uint8: each image's box cropped, resized to size x size with torchvision's antialiased
    bicubic (resized_crop(..., BICUBIC, antialias=True), rounded to uint8 as it rounds) and flipped where flip is 1.
    Images are grouped by size, each group padded into one tensor and resized by two batched matrix products."""
    order = sorted(range(len(images)), key=lambda i: images[i].shape[1] * images[i].shape[2])
    groups, height, width = [[]], 0, 0
    for i in order:
        height, width = max(height, images[i].shape[1]), max(width, images[i].shape[2])
        if groups[-1] and (len(groups[-1]) + 1) * 3 * height * width * 4 > GROUP_BYTES:
            groups.append([])
            height, width = images[i].shape[1:]
        groups[-1].append(i)
    resized = torch.cat([resized_group([images[i] for i in group], [boxes[i] for i in group], size)
                         for group in groups])
    return resized[torch.tensor(order).argsort().to(resized.device)]  # back in the batch's order


def resized_crops_one_by_one(images, boxes, size):
    """What resized_crops computes, through torchvision, one image at a time."""
    crops = [resized_crop(image, top, left, height, width, [size, size], InterpolationMode.BICUBIC, antialias=True)
             for image, (top, left, height, width, _) in zip(images, boxes)]
    return torch.stack([crop.flip(-1) if flip else crop for crop, (*_, flip) in zip(crops, boxes)])


def resized_group(images, boxes, size):
    height, width = (max(image.shape[d] for image in images) for d in (1, 2))
    with warnings.catch_warnings():  # nested tensors are a prototype API; this use is their oldest, stable one
        warnings.simplefilter('ignore', UserWarning)
        padded = torch.nested.as_nested_tensor(images).to(torch.float32).to_padded_tensor(
            0.0, output_size=(len(images), 3, height, width))  # (B, 3, H, W): one copy, whatever B
    top, left, crop_height, crop_width, flip = torch.tensor(boxes, dtype=torch.float64).to(padded.device).unbind(1)
    rows = resize_weights(top, crop_height, height, size).float()  # (B, size, H)
    columns = resize_weights(left, crop_width, width, size)  # (B, size, W)
    columns = torch.where(flip.bool().view(-1, 1, 1), columns.flip(1), columns).float()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')  # TF32's 10-bit weights would move pixels by a level or more
    try:
        resized = rows.unsqueeze(1) @ padded @ columns.transpose(1, 2).unsqueeze(1)  # (B, 3, size, size)
    finally:
        torch.set_float32_matmul_precision(previous)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def resize_weights(start, length, full, size, a=-0.5):
    """(B, size, full) float64: row o of image b holds the weights that output pixel o takes from each position of the
    image's full axis: torch's antialiased bicubic (the filter PIL uses, a = -0.5, widened by the scale when
    shrinking, renormalised) over the crop [start, start + length), zero outside it. start, length: (B,) float64."""
    scale = (length / size).view(-1, 1, 1)
    stretch = scale.clamp(min=1)  # the filter widens by the scale when shrinking (antialiasing), not when enlarging
    center = scale * (torch.arange(size, dtype=torch.float64, device=scale.device).view(1, -1, 1) + 0.5)
    first = (center - 2 * stretch + 0.5).floor().clamp(min=0)  # the taps torch's kernel visits, in crop coordinates
    last = torch.minimum((center + 2 * stretch + 0.5).floor(), length.view(-1, 1, 1))
    position = torch.arange(full, dtype=torch.float64, device=scale.device).view(1, 1, -1) - start.view(-1, 1, 1)
    x = ((position - center + 0.5) / stretch).abs()
    cubic = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, (((x - 5) * x + 8) * x - 4) * a)
    weights = torch.where((position >= first) & (position < last) & (x < 2), cubic, 0.0)
    return weights / weights.sum(2, keepdim=True)
