"""Videos as the model families take them: frames sampled from a file, and the video processors of
LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL run on PIL where transformers cannot build its own.

**Frames** (:func:`load_video`): decoded with PyAV (``av``, which lmms-eval installs), ``n =
min(total, max_frames)`` frames at ``np.linspace(0, total - 1, n, dtype=int)`` (fewer when ``fps``
caps them at that many per second of video) - the frames lmms-eval's own ``read_video`` (its default
pyav backend, what its ``llava_onevision`` model reads videos with) returns for the same file and
count (a test checks they are equal). :func:`probe_video` reads the frame count, size and rate from
the container without decoding, so a batch's token counts can be known before its frames are.

**Video processors**: every transformers video processor (``BaseVideoProcessor``) runs on
torchvision, which CPU-only installs of torch 2.13 lack (docs/lmms-eval.md). Where torchvision is
installed the processors are transformers' own; the offline processors
(:func:`tpkit.data.processor.build_onevision_processor`, the offline Qwen2-VL processor) carry these
stand-ins instead, which compute what ``BaseVideoProcessor._preprocess`` computes for frames given as
arrays: :class:`OnevisionVideoProcessorPil` (``LlavaOnevisionVideoProcessor``: each frame resized to
``size``, rescaled and normalised) and :class:`QwenVideoProcessorPil` (``Qwen2VLVideoProcessor``: one
``smart_resize`` per video, frames padded to a multiple of ``temporal_patch_size`` by repeating the
last, flattened into ``temporal x patch x patch`` patches in merge-unit order, ``video_grid_thw``).
Rescaling and normalisation are transformers' fused float32 arithmetic, so frames already at the
target size give the same pixel values bit for bit; a frame that must be resized goes through PIL's
bicubic (the PIL image processors' resize) instead of torchvision's antialiased bicubic, whose pixels
may differ slightly (not compared here: no torchvision). Frame sampling stays with the caller
(``do_sample_frames`` off, transformers' default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "OnevisionVideoProcessorPil",
    "QwenVideoProcessorPil",
    "Video",
    "VideoError",
    "load_video",
    "probe_video",
    "sample_indices",
]


class VideoError(ValueError):
    """A video file that cannot be read (names the file and why)."""


@dataclass
class Video:
    """Frames sampled from one video and where they came from (transformers' ``VideoMetadata`` keys)."""

    frames: np.ndarray  # (F, H, W, 3) uint8, RGB
    total_num_frames: int  # frames in the file
    fps: float | None  # the file's frame rate
    frames_indices: list[int]  # which of them ``frames`` holds

    def metadata(self) -> dict[str, Any]:
        """``video_metadata`` for a processor call: Qwen2.5-VL times its frames from it."""
        return {
            "total_num_frames": self.total_num_frames,
            "fps": self.fps,
            "frames_indices": self.frames_indices,
        }


def _av():
    try:
        import av
    except ModuleNotFoundError:
        raise ImportError(
            "reading video files needs PyAV: pip install av (lmms-eval installs it: pip install 'tpkit[lmms]')"
        ) from None
    return av


def probe_video(path: str | os.PathLike) -> tuple[int, int, int, float | None]:
    """(frames, height, width, frame rate) of a video file, from its container (nothing decoded, unless
    the container does not count its frames: then every frame is decoded once to count them)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = int(stream.frames or 0)
            rate = float(stream.average_rate) if stream.average_rate is not None else None
            height, width = int(stream.height), int(stream.width)
            if total <= 0:
                total = sum(1 for _ in container.decode(video=0))
    except (OSError, IndexError, av.error.FFmpegError) as e:
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    if total <= 0:
        raise VideoError(f"video {path} has no frames")
    return total, height, width, rate


def sample_indices(
    total: int, max_frames: int, fps: float | None = None, rate: float | None = None
) -> np.ndarray:
    """The frames lmms-eval's ``read_video`` keeps: ``min(total, max_frames)`` of them (at most ``fps``
    per second of video when both ``fps`` and the file's ``rate`` are known), evenly spaced, first and
    last included."""
    n = max_frames
    if fps is not None and rate:
        n = min(n, int(total / rate * fps))
    n = max(1, min(total, n))
    return np.linspace(0, total - 1, n, dtype=int)


def load_video(path: str | os.PathLike, max_frames: int = 32, fps: float | None = None) -> Video:
    """The sampled frames of a video file (see the module docstring), decoded in one pass."""
    av = _av()
    total, _, _, rate = probe_video(path)
    indices = sample_indices(total, max_frames, fps, rate)
    wanted = set(indices.tolist())
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            container.streams.video[0].thread_type = "AUTO"
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
    except (OSError, av.error.FFmpegError) as e:
        raise VideoError(f"cannot decode video {path}: {type(e).__name__}: {e}") from None
    missing = sorted(wanted - set(frames))
    if missing:
        raise VideoError(f"video {path}: frames {missing[:5]} of {total} did not decode")
    return Video(np.stack([frames[i] for i in indices]), total, rate, indices.tolist())


# ---- video processors on PIL ----------------------------------------------------------------------


def _frames(video: Any) -> torch.Tensor:
    """(F, C, H, W) uint8 from a (F, H, W, C) array, a :class:`Video` or a list of PIL frames."""
    if isinstance(video, Video):
        video = video.frames
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in video])
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"a video must be (frames, height, width, 3) RGB, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def _videos(videos: Any) -> list[torch.Tensor]:
    if isinstance(videos, (np.ndarray, Video)) or (isinstance(videos, torch.Tensor) and videos.dim() == 4):
        videos = [videos]
    return [_frames(v) for v in videos]


class _PilVideoProcessor:
    """What the two stand-ins share: the image processor's PIL resize, transformers' fused rescale and
    normalisation, and the attributes a processor reads from its video processor."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor  # its resize (PIL) and its resample, mean, std, rescale
        ip = image_processor
        self.image_mean = list(ip.image_mean)
        self.image_std = list(ip.image_std)
        self.rescale_factor = float(ip.rescale_factor)
        self.resample = ip.resample

    def _resize(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(F, C, H, W) uint8 at (height, width); unchanged when already that size (as torchvision)."""
        if tuple(frames.shape[-2:]) == (height, width):
            return frames
        from transformers.image_utils import SizeDict

        size = SizeDict(height=height, width=width)
        out = [self._pil_resize(f.numpy(), size) for f in frames]  # (C, H, W) each
        return torch.from_numpy(np.stack(out))

    def _pil_resize(self, frame: np.ndarray, size: Any) -> np.ndarray:
        from transformers.image_processing_backends import PilBackend

        # the PIL backend's own resize (not the image processor's override: Qwen's re-derives the size)
        return PilBackend.resize(self.image_processor, frame, size, resample=self.resample).astype(np.uint8)

    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """transformers' fused rescale + normalise, in float32 as ``rescale_and_normalize`` does it."""
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        return frames.to(torch.float32).sub(mean[:, None, None]).div(std[:, None, None])

    def _merge_and_standardize_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """The settings ``Processor._get_num_multimodal_tokens`` reads (no per-call overrides here)."""
        return dict(self.settings())

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _metadata(self, videos: list[torch.Tensor], video_metadata: Any) -> list[Any]:
        from transformers.video_utils import VideoMetadata

        given = (
            video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(videos)
        )
        out = []
        for v, m in zip(videos, given):
            m = m if m is not None else {}
            if not isinstance(m, VideoMetadata):
                m = VideoMetadata(**{"total_num_frames": v.shape[0], **m})
            out.append(m)
        return out


class OnevisionVideoProcessorPil(_PilVideoProcessor):
    """``LlavaOnevisionVideoProcessor`` for frames (see the module docstring): every frame resized to
    the image processor's ``size`` (384 x 384 for the 7B model), rescaled, normalised with its mean and
    std. Returns ``pixel_values_videos`` (videos, F, 3, H, W) (a list when frame counts differ)."""

    def settings(self) -> dict[str, Any]:
        size = self.image_processor.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        return {"size": {"height": int(get("height")), "width": int(get("width"))}}

    def __call__(self, videos: Any, video_metadata: Any = None, return_tensors: Any = None, **kwargs: Any):
        from transformers.feature_extraction_utils import BatchFeature

        size = self.settings()["size"]
        clips = [self._normalize(self._resize(v, size["height"], size["width"])) for v in _videos(videos)]
        same = len({tuple(c.shape) for c in clips}) == 1
        pixels = torch.stack(clips) if same and return_tensors == "pt" else clips
        data = {"pixel_values_videos": pixels, "video_metadata": self._metadata(clips, video_metadata)}
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata", "pixel_values_videos"])


class QwenVideoProcessorPil(_PilVideoProcessor):
    """``Qwen2VLVideoProcessor`` (also Qwen2.5-VL's) for frames (see the module docstring).

    Args:
        image_processor: the processor's ``Qwen2VLImageProcessorPil`` (patch, merge and temporal patch
            sizes, resample, mean, std come from it).
        min_pixels, max_pixels: the video's pixel budget per frame (``size`` of the video processor;
            transformers' defaults 128 x 28 x 28 and 768 x 28 x 28).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self, image_processor: Any, min_pixels: int = 128 * 28 * 28, max_pixels: int = 768 * 28 * 28
    ):
        super().__init__(image_processor)
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)

    def settings(self) -> dict[str, Any]:
        return {
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        }

    def _target(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        return smart_resize(
            height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    def get_num_of_video_patches(
        self, num_frames: int, height: int, width: int, videos_kwargs: Any = None
    ) -> int:
        """Patches of a ``num_frames`` x ``height`` x ``width`` video (the real processor's count)."""
        h, w = self._target(height, width)
        t = -(-num_frames // self.temporal_patch_size)
        return t * (h // self.patch_size) * (w // self.patch_size)

    def _patchify(self, video: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(F, C, H, W) float -> (t * h * w, C * T * P * P) patches in merge-unit order, [t, h, w]."""
        f, c, height, width = video.shape
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -f % tp:  # repeat the last frame, as stock pads
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
            f += pad
        t, h, w = f // tp, height // p, width // p
        x = video.reshape(t, tp, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, T, P, P)
        return x.reshape(t * h * w, c * tp * p * p), [t, h, w]

    def __call__(self, videos: Any, video_metadata: Any = None, return_tensors: Any = None, **kwargs: Any):
        from transformers.feature_extraction_utils import BatchFeature

        patches, grids, clips = [], [], _videos(videos)
        for v in clips:
            h, w = self._target(*v.shape[-2:])
            x, grid = self._patchify(self._normalize(self._resize(v, h, w)))
            patches.append(x)
            grids.append(grid)
        data = {
            "pixel_values_videos": torch.cat(patches),  # (sum of t * h * w, C * T * P * P)
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),  # (videos, 3)
            "video_metadata": self._metadata(clips, video_metadata),
        }
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata"])
