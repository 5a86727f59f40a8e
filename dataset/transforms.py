"""ALBEF's image transforms: CLIP normalisation, bicubic resize, RandAugment(2, 7)."""
import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import RandomAugment

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RANDAUG_OPS = ["Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateX", "TranslateY", "Rotate"]


def normalize():
    return transforms.Normalize(MEAN, STD)


class ToUint8Tensor:
    """PIL image or HWC uint8 array -> CHW uint8 tensor: ToTensor + Normalize deferred to the device."""

    def __call__(self, img):
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def normalize_uint8(images):
    """CHW uint8 images (any leading dims) -> ToTensor + Normalize's float32, bitwise: the same operations in
    the same order (to float, / 255, - mean, / std)."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


def train_transform(image_res, scale=(0.2, 1.0), randaugment=True, uint8=False):
    """ALBEF's pretrain transform (scale 0.2-1.0); fine-tuning uses scale (0.5, 1.0); ``scale=None`` resizes
    the whole image instead of cropping (grounding: the expression may name any part of it). ``uint8``: the
    output stays uint8 for ``normalize_uint8`` on the device."""
    resize = (transforms.Resize((image_res, image_res), interpolation=InterpolationMode.BICUBIC) if scale is None
              else transforms.RandomResizedCrop(image_res, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC))
    ops = [resize, transforms.RandomHorizontalFlip()]
    if randaugment:
        ops.append(RandomAugment(2, 7, isPIL=True, augs=RANDAUG_OPS))
    ops += [ToUint8Tensor()] if uint8 else [transforms.ToTensor(), normalize()]
    return transforms.Compose(ops)


def test_transform(image_res):
    """Resize the PIL image to a square (aspect not kept), bicubic, as every ALBEF evaluation does."""
    return transforms.Compose([transforms.Resize((image_res, image_res), interpolation=InterpolationMode.BICUBIC),
                               transforms.ToTensor(), normalize()])
