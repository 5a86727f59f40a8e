"""ALBEF's image transforms: CLIP normalisation, bicubic resize, RandAugment(2, 7)."""
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import RandomAugment

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RANDAUG_OPS = ["Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateX", "TranslateY", "Rotate"]


def normalize():
    return transforms.Normalize(MEAN, STD)


def train_transform(image_res, scale=(0.2, 1.0), randaugment=True):
    """ALBEF's pretrain transform (scale 0.2-1.0); fine-tuning uses scale (0.5, 1.0); ``scale=None`` resizes
    the whole image instead of cropping (grounding: the expression may name any part of it)."""
    resize = (transforms.Resize((image_res, image_res), interpolation=InterpolationMode.BICUBIC) if scale is None
              else transforms.RandomResizedCrop(image_res, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC))
    ops = [resize, transforms.RandomHorizontalFlip()]
    if randaugment:
        ops.append(RandomAugment(2, 7, isPIL=True, augs=RANDAUG_OPS))
    ops += [transforms.ToTensor(), normalize()]
    return transforms.Compose(ops)


def test_transform(image_res):
    """Resize the PIL image to a square (aspect not kept), bicubic, as every ALBEF evaluation does."""
    return transforms.Compose([transforms.Resize((image_res, image_res), interpolation=InterpolationMode.BICUBIC),
                               transforms.ToTensor(), normalize()])
