"""Videos: frames sampled from a file as lmms-eval samples them, and the PIL video processors (the
stand-ins for transformers' torchvision ones) against the image processors they share their
arithmetic with, and against transformers' own where torchvision is installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from tpkit.data.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_onevision_processor
from tpkit.data.video import (
    OnevisionVideoProcessorPil,
    QwenVideoProcessorPil,
    Video,
    VideoError,
    load_video,
    probe_video,
)

av = pytest.importorskip("av")  # lmms-eval installs it (pip install -e ".[test,lmms]")


def write_video(path, frames: int, height: int = 32, width: int = 48, rate: int = 4, seed: int = 0) -> str:
    """A small mp4 (mpeg4) of random-ish frames: a moving gradient, so frames differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.roll(base, 3 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def qwen_image_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=16 * 16,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("max_frames, fps", [(4, None), (32, None), (6, 2.0)])
def test_frames_are_the_ones_lmms_eval_reads(tmp_path, max_frames, fps):
    from lmms_eval.models.model_utils.load_video import read_video

    path = write_video(tmp_path / "v.mp4", frames=10)
    assert probe_video(path) == (10, 32, 48, 4.0)
    video = load_video(path, max_frames=max_frames, fps=fps)
    want = read_video(path, num_frm=max_frames, fps=fps)  # lmms-eval's default pyav backend
    assert video.frames.dtype == np.uint8 and video.frames.shape == want.shape
    assert np.array_equal(video.frames, want)
    assert video.total_num_frames == 10 and video.fps == 4.0
    assert video.frames_indices == np.linspace(0, 9, len(want), dtype=int).tolist()
    assert len(want) == {(4, None): 4, (32, None): 10, (6, 2.0): 5}[(max_frames, fps)]


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoError, match=r"cannot read video .*bad\.mp4"):
        load_video(bad)


def test_onevision_frames_are_normalised_as_its_image_processor_does():
    """A frame at the processor's size: the video stand-in's pixels are the image processor's base
    view of the same frame (no resize either way; transformers' fused float32 normalisation against
    the image processor's unfused one: rounding apart); a frame of another size is resized to it."""
    processor = build_onevision_processor(image_size=32)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = processor.video_processor([frames], return_tensors="pt")["pixel_values_videos"]
    assert out.shape == (1, 3, 3, 32, 32) and out.dtype == torch.float32
    for f in range(3):
        base = processor.image_processor(Image.fromarray(frames[f]), return_tensors="pt")["pixel_values"][
            0, 0
        ]
        torch.testing.assert_close(out[0, f], base, rtol=0, atol=1e-6)
    big = OnevisionVideoProcessorPil(processor.image_processor)(
        [rng.integers(0, 255, (2, 48, 64, 3), np.uint8)]
    )
    assert tuple(big["pixel_values_videos"][0].shape) == (2, 3, 32, 32)


def test_qwen_video_of_two_equal_frames_is_the_image():
    """Qwen repeats an image in time to make its one temporal patch: a video of that frame twice has
    the image's patches, in the same merge-unit order, and grid (1, h, w)."""
    ip = qwen_image_processor()
    vp = QwenVideoProcessorPil(ip, min_pixels=16 * 16, max_pixels=16 * 16)
    frame = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    image = ip(Image.fromarray(frame), return_tensors="pt")
    video = vp([np.stack([frame, frame])], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 8, 8]]
    torch.testing.assert_close(video["pixel_values_videos"], image["pixel_values"].float(), rtol=0, atol=1e-6)


def test_qwen_video_pads_odd_frames_and_counts_as_the_processor():
    ip = qwen_image_processor()
    vp = QwenVideoProcessorPil(ip, min_pixels=8 * 8, max_pixels=24 * 24)
    rng = np.random.default_rng(2)
    three = rng.integers(0, 255, (3, 20, 28, 3), dtype=np.uint8)  # resized to 20 x 28 -> smart_resize
    out = vp([three, Video(three[:2], 2, None, [0, 1])], return_tensors="pt")
    (t, h, w), second = out["video_grid_thw"].tolist()
    assert (t, h, w) == (2, 10, 14) and second == [1, 10, 14]  # 3 frames -> 2 temporal patches
    assert out["pixel_values_videos"].shape == (2 * 10 * 14 + 10 * 14, 3 * 2 * 2 * 2)
    assert vp.get_num_of_video_patches(3, 20, 28) == 2 * 10 * 14
    # the padded second temporal patch is the last frame twice: the patches of a video [f2, f2]
    last = vp([np.stack([three[2], three[2]])], return_tensors="pt")["pixel_values_videos"]
    torch.testing.assert_close(out["pixel_values_videos"][10 * 14 : 2 * 10 * 14], last, rtol=0, atol=0)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="needs torchvision (GPU installs)"
)
def test_stand_ins_equal_transformers_video_processors():  # pragma: no cover - runs where torchvision is
    """Where torchvision is installed: the stand-ins give what transformers' own video processors give,
    bit for bit for frames at the target size."""
    from transformers import LlavaOnevisionVideoProcessor, Qwen2VLVideoProcessor

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    ov = build_onevision_processor(image_size=32)
    real = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    torch.testing.assert_close(
        ov.video_processor([frames], return_tensors="pt")["pixel_values_videos"],
        real([frames], return_tensors="pt")["pixel_values_videos"], rtol=0, atol=0,
    )  # fmt: skip
    vp = QwenVideoProcessorPil(qwen_image_processor(), min_pixels=32 * 32, max_pixels=32 * 32)
    real = Qwen2VLVideoProcessor(patch_size=2, merge_size=2, min_pixels=32 * 32, max_pixels=32 * 32)
    a, b = vp([frames], return_tensors="pt"), real([frames], return_tensors="pt")
    assert a["video_grid_thw"].tolist() == b["video_grid_thw"].tolist()
    torch.testing.assert_close(a["pixel_values_videos"], b["pixel_values_videos"], rtol=0, atol=0)
