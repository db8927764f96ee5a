"""Frame features from a frozen vision tower (SigLIP / CLIP) loaded with transformers from a folder.

LLaVA convention (paper.md §1.6): the hidden state of one chosen layer (default -2, the one before
last), patch tokens only (CLIP's CLS token is dropped; SigLIP has none), optionally average-pooled
over the patch grid, stored as float16.

    encoder = FrameEncoder(EncoderConfig(path="siglip-so400m", layer=-2, pool=2))
    features = encoder(frames)   # uint8 [N, H, W, 3] -> float16 [N, P, D] numpy
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# PIL resample codes as saved in preprocessor_config.json -> torch interpolation modes. Lanczos (1)
# has no torch equivalent; bicubic is its closest.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


@dataclass(kw_only=True)
class EncoderConfig:
    path: str
    """The vision tower (or a full CLIP/SigLIP model) with its preprocessor_config.json: a local
    folder or a hub id (`google/siglip2-so400m-patch16-384`, read from the hub cache when offline)."""
    layer: int = -2
    """Index into the hidden states (0 = embeddings, -1 = last layer)."""
    pool: int = 1
    """Average-pool the patch grid with this kernel and stride (1 = no pooling, 2 = 2x2)."""
    batch_size: int = 32
    """Frames per forward pass."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""

    def __post_init__(self):
        if self.pool < 1:
            raise ValueError(f"encoder pool: expected >= 1, got {self.pool}")
        if self.batch_size < 1:
            raise ValueError(f"encoder batch_size: expected >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class Preprocess:
    """The image processor's saved settings, applied with torch ops on whole frame batches."""
    size: dict
    resample: str
    crop: tuple[int, int] | None
    rescale: float
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def load(cls, source: str) -> Preprocess:
        path = tower_file(source, "preprocessor_config.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the vision encoder folder needs its image "
                                    "processor config (size, image_mean, image_std)")
        cfg = json.loads(path.read_text())
        size = cfg.get("size") if cfg.get("do_resize", True) else None
        if size is not None and not ({"height", "width"} <= size.keys() or "shortest_edge" in size):
            raise ValueError(f"{path}: field 'size': expected height/width or shortest_edge, got {size}")
        crop = None
        if cfg.get("do_center_crop") and cfg.get("crop_size"):
            c = cfg["crop_size"]
            crop = (c["height"], c["width"]) if isinstance(c, dict) else (int(c), int(c))
        normalize = cfg.get("do_normalize", True)
        return cls(size=size or {}, resample=_RESAMPLE.get(cfg.get("resample", 3), "bicubic"), crop=crop,
                   rescale=cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0,
                   mean=tuple(cfg["image_mean"]) if normalize else None,
                   std=tuple(cfg["image_std"]) if normalize else None)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> float32 [N, 3, h, w]."""
        x = frames.permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        if "height" in self.size:
            out = (self.size["height"], self.size["width"])
        elif "shortest_edge" in self.size:
            s = self.size["shortest_edge"]
            # the long side is truncated, not rounded, as the image processors do
            out = (s, max(1, int(w * s / h))) if h <= w else (max(1, int(h * s / w)), s)
        else:
            out = (h, w)
        if out != (h, w):
            antialias = self.resample != "nearest"
            x = F.interpolate(x, size=out, mode=self.resample, antialias=antialias,
                              **({} if self.resample == "nearest" else {"align_corners": False}))
            x = x.clamp(0, 255)  # bicubic overshoots; PIL clips to uint8 range too
        if self.crop is not None:
            ch, cw = self.crop
            top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
            x = x[..., top:top + ch, left:left + cw]
        x = x * self.rescale
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


def tower_file(source: str, name: str) -> Path:
    """`name` in the vision tower's local folder, or fetched from hub repo `source` (read from the
    hub cache under HF_HUB_OFFLINE=1); a path that may not exist, for the caller's error."""
    if Path(source).is_dir():
        return Path(source) / name
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, name))
    except (OSError, ValueError):  # not in the repo (or its cache): the caller names what is missing
        return Path(source) / name


def _reason(source: str, err: Exception) -> str:
    """Why `source` did not load, in one line; a path says it is missing, not that ids look otherwise."""
    if source.startswith(("/", ".", "~")):
        return "no such folder"
    return " ".join(str(err).split())[:300]


def pick_device(name: str) -> torch.device:
    """'auto': this process's GPU when there is one, else the CPU.

    Several extraction tasks on one node each take the GPU of their local rank (LOCAL_RANK from
    torchrun, SLURM_LOCALID from srun), not all of them GPU 0; a task that sees a single GPU
    (SLURM's --gpus-per-task) uses it.
    """
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", local % torch.cuda.device_count())


class FrameEncoder:
    """Frozen vision tower: uint8 frames in, float16 patch features [N, P, D] out."""

    def __init__(self, config: EncoderConfig):
        from transformers import AutoModel

        folder = Path(config.path)
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'}: missing; expected a Hugging Face "
                                    "folder holding a SigLIP/CLIP vision model")
        self.config = config
        self.device = pick_device(config.device)
        try:  # a local folder or a hub id (downloaded, or read from the hub cache when offline)
            model = AutoModel.from_pretrained(config.path)
        except OSError as err:  # not a folder, not a valid id, not on the hub, offline and not cached
            raise FileNotFoundError(f"{config.path}: neither a local folder nor a hub id of a SigLIP/CLIP "
                                    f"vision model that resolves ({_reason(config.path, err)})") from None
        if hasattr(model.config, "vision_config"):  # a full CLIP/SigLIP: keep only the image tower
            if not hasattr(model, "vision_model"):
                raise ValueError(f"{folder}: {type(model).__name__} has no vision_model to extract from")
            model = model.vision_model
        vcfg = model.config
        self.grid = vcfg.image_size // vcfg.patch_size
        self.image_size = vcfg.image_size
        self.dim = vcfg.hidden_size
        n_states = vcfg.num_hidden_layers + 1
        if not -n_states <= config.layer < n_states:
            raise ValueError(f"encoder layer {config.layer}: {folder} has {n_states} hidden states "
                             f"(embeddings + {vcfg.num_hidden_layers} layers)")
        # bf16 halves the memory and time on GPU; features are stored as float16 either way.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.preprocess = Preprocess.load(config.path)
        self.name = folder.name
        pooled = math.ceil(self.grid / config.pool)
        self.patches_per_frame = pooled * pooled

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float16 [N, P, D] with P = ceil(grid / pool)^2."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"FrameEncoder: expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
        out = []
        for start in range(0, len(frames), self.config.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(frames[start:start + self.config.batch_size]))
            pixels = self.preprocess(batch.to(self.device))
            if pixels.shape[-2:] != (self.image_size, self.image_size):
                raise ValueError(f"{self.config.path}: preprocessing gives {tuple(pixels.shape[-2:])} "
                                 f"images but the model expects {self.image_size}x{self.image_size}")
            states = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=True).hidden_states
            tokens = states[self.config.layer]  # [n, (1 +) grid*grid, D]
            if tokens.shape[1] == self.grid * self.grid + 1:
                tokens = tokens[:, 1:]  # CLIP's CLS token
            out.append(self._pool(tokens).to(torch.float16).cpu())
        return torch.cat(out).numpy()

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.pool == 1:
            return tokens
        n, _, d = tokens.shape
        grid = tokens.float().transpose(1, 2).reshape(n, d, self.grid, self.grid)
        # ceil_mode keeps the border rows of odd grids (SigLIP's 27x27) as smaller windows.
        pooled = F.avg_pool2d(grid, self.config.pool, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)
