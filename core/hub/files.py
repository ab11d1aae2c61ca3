"""A Hugging Face repo's files as a person picks among them: one entry per quantization, split parts together,
vision projectors (mmproj) apart. Pure functions over file names and sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# `name-00001-of-00003.gguf`: llama.cpp's split naming (gguf-split), one model in parts.
_SPLIT = re.compile(r'^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$', re.I)
# The quantization label in a file name, as llama.cpp's quantize and the usual uploaders write it.
_QUANT = re.compile(
    r'(?<![A-Za-z0-9])(?P<q>(?:I?Q[1-8](?:_[0-9A-Z]+)*(?:_[KSML]+)?)|(?:MXFP4(?:_MOE)?)|(?:TQ[12]_0)|BF16|F16|F32|FP16|FP32)'
    r'(?![A-Za-z0-9])',
    re.I,
)


@dataclass
class RepoFile:
    path: str
    size: int | None
    sha256: str | None  # the LFS oid: what a download is checked against


@dataclass
class Variant:
    """One downloadable model: a single file or all parts of a split one."""

    name: str  # the file name, or the first part's for a split model
    quant: str | None
    files: list[RepoFile] = field(default_factory=list)
    mmproj: bool = False

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    @property
    def complete(self) -> bool:
        """All parts of a split model are in the repo."""
        m = _SPLIT.match(self.name.rsplit('/', 1)[-1])
        return m is None or len(self.files) == int(m.group('total'))

    def as_dict(self) -> dict[str, Any]:
        return {
            'name': self.name,
            'quant': self.quant,
            'size': self.size,
            'parts': len(self.files),
            'complete': self.complete,
            'mmproj': self.mmproj,
            'files': [{'path': f.path, 'size': f.size, 'sha256': f.sha256} for f in self.files],
        }


def quant_of(filename: str) -> str | None:
    """The quantization label in a file name (Q4_K_M, IQ2_XS, F16, ...), upper case; None when it names none."""
    base = filename.rsplit('/', 1)[-1]
    m = _SPLIT.match(base)
    stem = m.group('stem') if m else base.removesuffix('.gguf').removesuffix('.GGUF')
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def is_mmproj(filename: str) -> bool:
    return 'mmproj' in filename.rsplit('/', 1)[-1].lower()


def variants(files: list[RepoFile]) -> list[Variant]:
    """GGUF files grouped: split parts into one variant (in part order), projectors marked; sorted by size."""
    singles: list[Variant] = []
    splits: dict[str, Variant] = {}
    for f in files:
        base = f.path.rsplit('/', 1)[-1]
        if not base.lower().endswith('.gguf'):
            continue
        m = _SPLIT.match(base)
        if m is None:
            singles.append(Variant(f.path, quant_of(f.path), [f], is_mmproj(f.path)))
            continue
        key = f.path[: len(f.path) - len(base)] + m.group('stem')
        v = splits.setdefault(key, Variant('', quant_of(f.path), [], is_mmproj(f.path)))
        v.files.append(f)
    for v in splits.values():
        v.files.sort(key=lambda f: f.path)
        v.name = v.files[0].path
    return sorted([*singles, *splits.values()], key=lambda v: (v.mmproj, v.size or 0, v.name))
