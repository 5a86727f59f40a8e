"""RandAugment on numpy/OpenCV with ALBEF's op list and level mapping (spec §8.3).

Ops: Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate. Each of the
N chosen ops (with replacement) runs with probability 0.5 at magnitude M of 10. Unlike the original,
Sharpness clips before casting to uint8 instead of wrapping around.
"""
import cv2
import numpy as np

MAX_LEVEL = 10.0
FILL = (128, 128, 128)


def _lut(img, table):
    return cv2.LUT(img, np.clip(table, 0, 255).astype(np.uint8))


def identity(img, *_):
    return img


def autocontrast(img, *_):
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi <= lo:
            out[..., c] = ch
        else:
            table = (np.arange(256) - lo) * (255.0 / (hi - lo))
            out[..., c] = _lut(ch, table)
    return out


def equalize(img, *_):
    """PIL-style per-channel histogram equalisation."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        nz = hist[hist > 0]
        step = (nz.sum() - nz[-1]) // 255 if len(nz) else 0
        if step == 0:
            out[..., c] = ch
            continue
        table = (np.cumsum(hist) - hist + step // 2) // step
        out[..., c] = _lut(ch, table)
    return out


def brightness(img, factor, *_):
    return _lut(img, np.arange(256) * factor)


def sharpness(img, factor, *_):
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    blurred = cv2.filter2D(img.astype(np.float32), -1, kernel)
    out = img.astype(np.float32).copy()
    inner = blurred[1:-1, 1:-1] * (1 - factor) + img[1:-1, 1:-1].astype(np.float32) * factor
    out[1:-1, 1:-1] = inner
    return np.clip(out, 0, 255).astype(np.uint8)


def _warp(img, m):
    h, w = img.shape[:2]
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=FILL)


def shear_x(img, factor, *_):
    return _warp(img, np.float32([[1, factor, 0], [0, 1, 0]]))


def shear_y(img, factor, *_):
    return _warp(img, np.float32([[1, 0, 0], [factor, 1, 0]]))


def translate_x(img, offset, *_):
    return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]))


def translate_y(img, offset, *_):
    return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]))


def rotate(img, degree, *_):
    h, w = img.shape[:2]
    return _warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), degree, 1))


def _signed(v):
    return v if np.random.random() > 0.5 else -v


def _enhance_level(level):
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


ARGS = {
    "Identity": lambda level: (),
    "AutoContrast": lambda level: (),
    "Equalize": lambda level: (),
    "Brightness": _enhance_level,
    "Sharpness": _enhance_level,
    "ShearX": lambda level: (_signed(level / MAX_LEVEL * 0.3),),
    "ShearY": lambda level: (_signed(level / MAX_LEVEL * 0.3),),
    "TranslateX": lambda level: (_signed(level / MAX_LEVEL * 10.0),),
    "TranslateY": lambda level: (_signed(level / MAX_LEVEL * 10.0),),
    "Rotate": lambda level: (_signed(level / MAX_LEVEL * 30),),
}
OPS = {
    "Identity": identity, "AutoContrast": autocontrast, "Equalize": equalize, "Brightness": brightness,
    "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
    "TranslateY": translate_y, "Rotate": rotate,
}


class RandomAugment:
    def __init__(self, N=2, M=7, isPIL=True, augs=None):
        self.N, self.M, self.isPIL = N, M, isPIL
        self.augs = list(augs) if augs else list(OPS)
        unknown = [a for a in self.augs if a not in OPS]
        if unknown:
            raise ValueError(f"RandomAugment: unknown ops {unknown}; known: {list(OPS)}")

    def __call__(self, img):
        if self.isPIL:
            img = np.array(img.convert("RGB"))   # writable copy
        img = np.ascontiguousarray(img)
        for name in np.random.choice(self.augs, self.N):
            if np.random.random() > 0.5:
                continue
            img = OPS[name](img, *ARGS[name](self.M))
        return img
