"""Four light reward workers on synthetic video, for the MPS benchmark and examples.

Each ``*_scorer`` is a factory: it builds the model and a synthetic video batch (the setup that
the runtime keeps out of the timed region) and returns the zero-argument step that scores the
batch, the way a reward worker in a GRPO loop scores each rollout batch:

* ``cnn_scorer``: a small convolutional quality scorer (random weights), per frame, averaged.
* ``vit_scorer``: a small ViT (patch 8, random weights) scoring each frame from its CLS token.
* ``sharpness_scorer``: variance of the Laplacian of the luminance (a classic blur detector).
* ``motion_scorer``: mean absolute difference of consecutive frames (static-clip detector).

Only torch is imported (not tbkernels), so the runtime can load this file by path in a fresh
worker process without importing the whole package. Random weights are deliberate: no weights are
downloaded anywhere (DESIGN.md), and the compute -- not the scores -- is what the benchmark needs.
"""
import torch
from torch import nn


def _setup(device, threads, seed):
    if threads is not None:
        torch.set_num_threads(int(threads))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    return torch.device(device)


def synthetic_video(batch=4, frames=16, size=64, seed=0, device="cpu", dtype=torch.float32):
    """[batch, frames, 3, size, size] in [0, 1]: a coloured square moving at a per-sample velocity
    over a gradient background, with a little noise (so sharpness and motion are not constant)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, size).view(1, 1, size, 1)
    xs = torch.linspace(0, 1, size).view(1, 1, 1, size)
    t = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1)
    start = torch.rand(batch, 2, generator=g) * 0.6 + 0.2
    vel = (torch.rand(batch, 2, generator=g) - 0.5) * 0.04
    cy = (start[:, 0].view(batch, 1, 1, 1) + vel[:, 0].view(batch, 1, 1, 1) * t) % 1.0
    cx = (start[:, 1].view(batch, 1, 1, 1) + vel[:, 1].view(batch, 1, 1, 1) * t) % 1.0
    half = 0.12
    mask = ((ys - cy).abs() < half) & ((xs - cx).abs() < half)            # [B, T, H, W]
    colour = torch.rand(batch, 3, generator=g).view(batch, 1, 3, 1, 1)
    background = torch.stack([ys.expand(1, 1, size, size)[0, 0], xs.expand(1, 1, size, size)[0, 0],
                              0.5 * torch.ones(size, size)]).view(1, 1, 3, size, size) * 0.5
    video = torch.where(mask.unsqueeze(2), colour, background)
    video = video + 0.02 * torch.randn(video.shape, generator=g)
    return video.clamp(0, 1).to(device=device, dtype=dtype)


class SmallCNN(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, 1, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, 1)

    def forward(self, frames):                      # [N, 3, H, W] -> [N]
        return self.head(self.features(frames)).squeeze(-1)


class SmallViT(nn.Module):
    def __init__(self, size=64, patch=8, dim=192, depth=4, heads=3):
        super().__init__()
        n = (size // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, frames):                      # [N, 3, H, W] -> [N]
        x = self.embed(frames).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0])).squeeze(-1)


def _model_step(model, video, iters):
    b, t = video.shape[:2]
    frames = video.reshape(b * t, *video.shape[2:])

    @torch.inference_mode()
    def step():
        for _ in range(iters):
            s = model(frames)
        return torch.sigmoid(s.view(b, t).float().mean(1)).tolist()
    return step


def cnn_scorer(batch=4, frames=16, size=64, width=32, iters=1, device="auto", threads=None,
               seed=0, dtype="float32"):
    dev = _setup(device, threads, seed)
    dt = getattr(torch, dtype)
    model = SmallCNN(width).to(dev, dt).eval()
    return _model_step(model, synthetic_video(batch, frames, size, seed, dev, dt), iters)


def vit_scorer(batch=4, frames=16, size=64, patch=8, dim=192, depth=4, heads=3, iters=1,
               device="auto", threads=None, seed=0, dtype="float32"):
    dev = _setup(device, threads, seed)
    dt = getattr(torch, dtype)
    model = SmallViT(size, patch, dim, depth, heads).to(dev, dt).eval()
    return _model_step(model, synthetic_video(batch, frames, size, seed, dev, dt), iters)


def sharpness_scorer(batch=4, frames=16, size=64, iters=1, device="auto", threads=None, seed=0):
    dev = _setup(device, threads, seed)
    video = synthetic_video(batch, frames, size, seed, dev)
    lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], device=dev).view(1, 1, 3, 3)
    luma_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 1, 3, 1, 1)

    @torch.inference_mode()
    def step():
        for _ in range(iters):
            y = (video * luma_w).sum(2).flatten(0, 1).unsqueeze(1)        # [B*T, 1, H, W]
            v = torch.nn.functional.conv2d(y, lap).flatten(1).var(1)      # Laplacian variance
        return v.view(batch, frames).mean(1).tolist()
    return step


def motion_scorer(batch=4, frames=16, size=64, iters=1, device="auto", threads=None, seed=0):
    dev = _setup(device, threads, seed)
    video = synthetic_video(batch, frames, size, seed, dev)

    @torch.inference_mode()
    def step():
        for _ in range(iters):
            d = (video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(1)
        return d.tolist()
    return step


SCORERS = {"cnn": cnn_scorer, "vit": vit_scorer, "sharpness": sharpness_scorer,
           "motion": motion_scorer}
