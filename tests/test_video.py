"""Video: frame sampling (spec 6.2 table and transformers' sample_frames), timestamps, prompt layout, and a real clip
written with PyAV going through the processor end to end.

transformers' video processor needs torchvision (never installed here), so its pixels are not compared; its
``sample_frames`` and config loading run without it and are compared directly.
"""

import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from glm4v_ms.processing.media import MissingDependencyError
from glm4v_ms.processing.processor import Glm4vProcessor, MixedMediaError
from glm4v_ms.processing.tiny_tokenizer import build_tiny_tokenizer
from glm4v_ms.processing.video_processing import (Video, VideoProcessorConfig, group_timestamps, load_video,
                                       preprocess_video, sample_frame_indices)

av = pytest.importorskip("av")  # fallback only: CI installs av


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("glm4v_tiny_video"))
    build_tiny_tokenizer(path)
    with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:
        json.dump({"size": {"shortest_edge": 12544, "longest_edge": 47040000}, "fps": 2, "max_duration": 300,
                   "video_processor_type": "Glm4vVideoProcessor"}, f)
    return path


@pytest.fixture(scope="module")
def processor(folder):
    return Glm4vProcessor.from_pretrained(folder)


def _frame(i, height=48, width=64):
    """Frame i: red = 8*i (mod 256), green = 255 - red, a blue block on the left half."""
    a = np.zeros((height, width, 3), np.uint8)
    red = (8 * i) % 256
    a[..., 0], a[..., 1], a[:, : width // 2, 2] = red, 255 - red, 128
    return a


def _write_clip(path, codec, pix_fmt, frames=30, fps=10):
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.bit_rate = 4_000_000  # high enough that a lossy codec keeps each frame's level within a few steps
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------ frame sampling
# Worked from spec 6.2 (n = floor(duration * 2) at ceil(i * fps / 2); > 300 s: 600 points over [0, duration]):
SAMPLING_TABLE = [
    # (total, fps, duration, expected)
    (30, 10.0, 3.0, [0, 5, 10, 15, 20, 25]),                  # 3 s: ceil(5i)
    (10, 4.0, 2.5, [0, 2, 4, 6, 8, 8]),                       # 5 frames, odd -> repeat 8
    (7, 2.0, 3.5, [0, 1, 2, 3, 4, 5, 6, 6]),                  # every frame, odd -> repeat 6
    (45, 24.0, 1.875, [0, 12, 24, 24]),                       # floor(3.75) = 3 at ceil(12i)
    (5, 30.0, 5 / 30, [0, 0]),                                # 0.17 s: n = 0 -> 1 (5.x rule), then paired
    # no duration: round(99/25) + 1 = 5 s -> ceil(12.5 i) = 0 13 25 38 50 63 75 88 100->99 113->99, dedup, odd
    (100, 25.0, None, [0, 13, 25, 38, 50, 63, 75, 88, 99, 99]),
    (400, 1.0, 400.0, list(range(400))),                      # > 300 s but 600 >= 400 frames: all of them
]


@pytest.mark.parametrize("total, fps, duration, expected", SAMPLING_TABLE)
def test_sampling_table(total, fps, duration, expected):
    assert sample_frame_indices(total, fps, duration=duration) == expected


def test_sampling_long_videos():
    # 400 s at 30 fps: t_k = 400 k / 599, index ceil(30 t_k) = ceil(12000 k / 599): 0, 21, 41, 61, ... 11980, 11999
    got = sample_frame_indices(12000, 30.0, duration=400.0)
    assert len(got) == 600 and got[:4] == [0, 21, 41, 61] and got[-2:] == [11980, 11999]
    # 301 s at 2 fps (602 frames): ceil(602 k / 599) = 0, 2, 3, 4, ... last frame 601
    got = sample_frame_indices(602, 2.0, duration=301.0)
    assert len(got) == 600 and got[:4] == [0, 2, 3, 4] and got[-1] == 601


def test_sampling_equals_transformers():
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import VideoMetadata
    stub = SimpleNamespace(fps=2, max_duration=300)  # sample_frames only reads these two attributes
    for total, fps in [(30, 10.0), (31, 10.0), (95, 29.97), (250, 24.0), (7, 2.0), (3, 1.0), (1000, 3.3),
                       (18001, 60.0), (9000, 30.0), (650, 2.0), (1201, 4.0), (61, 1.0)]:
        meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        hf = Glm4vVideoProcessor.sample_frames(stub, meta).tolist()
        assert sample_frame_indices(total, fps, duration=total / fps) == hf, (total, fps)
    # 4.57 samples nothing from a clip under half a second; we keep one frame (5.x), paired to two.
    short = VideoMetadata(total_num_frames=5, fps=30.0, duration=5 / 30)
    assert Glm4vVideoProcessor.sample_frames(stub, short).tolist() == []


def test_group_timestamps():
    assert group_timestamps([0, 5, 10, 15, 20, 25], 10.0, 3) == [0.0, 1.0, 2.0]
    assert group_timestamps([0, 12, 24, 24], 24.0, 2) == [0.0, 1.0]
    assert group_timestamps([0, 45], 30.0, 2) == [0.0, 0.0]  # padded with the last value


# ------------------------------------------------------------------------------------------------- prompt layout
def test_expanded_prompt_layout(processor):
    frames = [_frame(i, 56, 84) for i in range(50)]  # 50 frames at 10 fps: 5 s -> 10 samples -> 5 groups
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 10},
                                                 {"type": "text", "text": "Describe the video."}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    t, h, w = out["video_grid_thw"][0].tolist()
    tok = processor.tokenizer
    ids = out["input_ids"][0].tolist()
    assert (t, out["pixel_values_videos"].shape) == (5, (t * h * w, 1176))
    start, end = ids.index(tok.convert_tokens_to_ids("<|begin_of_video|>")), \
        ids.index(tok.convert_tokens_to_ids("<|end_of_video|>"))
    expected = []
    for second in range(5):  # groups start at frames 0, 10, 20, 30, 40 = 0 s ... 4 s
        expected += tok.convert_tokens_to_ids(["<|begin_of_image|>"] + ["<|image|>"] * (h * w // 4)
                                              + ["<|end_of_image|>"]) + tok.encode(str(second))
    assert ids[start + 1: end] == expected
    assert tok.convert_tokens_to_ids("<|video|>") not in ids  # the video placeholder itself disappears
    assert processor.decode(ids).endswith("<|end_of_video|>Describe the video.<|assistant|>\n")


def test_mixing_images_and_video_is_an_error(processor):
    frames = [_frame(i) for i in range(4)]
    conversation = [{"role": "user", "content": [{"type": "image", "image": frames[0]},
                                                 {"type": "video", "video": frames, "fps": 2}]}]
    with pytest.raises(MixedMediaError, match="numpy array shape \\(48, 64, 3\\)") as err:
        processor.apply_chat_template(conversation, tokenize=True)
    assert "video frames" in str(err.value)
    # Separate prompts in one batch are fine.
    batch = [[{"role": "user", "content": [{"type": "image", "image": frames[0]}]}],
             [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 2}]}]]
    out = processor.apply_chat_template(batch, tokenize=True, return_dict=True)
    assert out["image_grid_thw"].shape == (1, 3) and out["video_grid_thw"].shape == (1, 3)


# ----------------------------------------------------------------------------------------------- real clip (PyAV)
def test_real_clip_end_to_end(processor, tmp_path):
    path = _write_clip(str(tmp_path / "clip.mp4"), "mpeg4", "yuv420p")  # 3 s, 10 fps, 64x48
    video = load_video(path, processor.video_config)
    assert video.frame_indices == [0, 5, 10, 15, 20, 25] and video.fps == 10.0 and video.total_num_frames == 30
    for index, frame in zip(video.frame_indices, video.frames):  # the right frames: neighbours differ by 8
        assert abs(float(frame[..., 0].mean()) - 8 * index) < 4, index
    conversation = [{"role": "user", "content": [{"type": "video", "video": path},
                                                 {"type": "text", "text": "Describe the video."}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    # smart_resize(6, 48, 64): round -> 56x56, 6*56*56 >= 12544 -> 56x56 -> 4x4 patches, 3 groups
    assert out["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert out["pixel_values_videos"].shape == (48, 1176) and out["pixel_values_videos"].dtype == np.float32
    assert set(out) == {"input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"}
    text = processor.decode(out["input_ids"][0])
    group = "<|begin_of_image|>" + "<|image|>" * 4 + "<|end_of_image|>"
    assert f"<|begin_of_video|>{group}0{group}1{group}2<|end_of_video|>Describe the video." in text


def test_lossless_file_equals_frame_list(processor, tmp_path):
    # ffv1 in Matroska is lossless and records no frame count, so the decode-everything path runs.
    path = _write_clip(str(tmp_path / "clip.mkv"), "ffv1", "bgr0")
    from_file = processor(text="<|video|>", videos=[path])
    from_frames = processor(text="<|video|>", videos=[Video.from_frames([_frame(i) for i in range(30)], fps=10)])
    for key in ("input_ids", "video_grid_thw", "pixel_values_videos"):
        np.testing.assert_array_equal(from_file[key], from_frames[key])


def test_video_pixels_follow_image_pipeline():
    # Each temporal patch holds two consecutive sampled frames, normalised like images.
    config = VideoProcessorConfig()
    frames = [_frame(i, 56, 56) for i in range(4)]
    out = preprocess_video(Video.from_frames(frames, fps=2.0), config)
    assert out["grid_thw"] == (2, 4, 4) and out["frame_indices"] == [0, 1, 2, 3]
    rows = out["patches"].reshape(2, 16, 3, 2, 14, 14)  # [t, h*w, C, tp, p, p]
    mean, std = np.array(config.image_mean, np.float32), np.array(config.image_std, np.float32)
    expected_red = (np.float32(8 * 2 / 255) - mean[0]) / std[0]  # group 1, first frame (frame 2), channel 0
    assert np.allclose(rows[1, :, 0, 0], expected_red, atol=1e-6)
    assert np.allclose(rows[1, :, 0, 1], (np.float32(8 * 3 / 255) - mean[0]) / std[0], atol=1e-6)


def test_frames_as_image_files(tmp_path):
    from PIL import Image
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(_frame(i, 56, 56)).save(paths[-1])
    config = VideoProcessorConfig()
    from_files = preprocess_video(Video.from_frames(paths, fps=2.0), config)
    from_arrays = preprocess_video(Video.from_frames([_frame(i, 56, 56) for i in range(4)], fps=2.0), config)
    np.testing.assert_array_equal(from_files["patches"], from_arrays["patches"])


def test_odd_frame_count_is_padded():
    frames = [_frame(i, 56, 56) for i in range(3)]
    config = VideoProcessorConfig(do_sample_frames=False)
    out = preprocess_video(Video.from_frames(frames, fps=1.0), config)
    rows = out["patches"].reshape(2, 16, 3, 2, 14, 14)
    assert out["grid_thw"] == (2, 4, 4) and out["timestamps"] == [0.0, 2.0]
    np.testing.assert_array_equal(rows[1, :, :, 0], rows[1, :, :, 1])  # last frame repeated


def test_video_config_falls_back_like_transformers(tmp_path):
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    build_tiny_tokenizer(str(tmp_path))
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": 12544, "longest_edge": 9633792}}, f)
    ours = Glm4vProcessor.from_pretrained(str(tmp_path)).video_config
    hf = Glm4vVideoProcessor.from_pretrained(str(tmp_path))
    assert (ours.min_pixels, ours.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"]) == \
        (12544, 9633792)
    assert (ours.fps, ours.max_duration) == (hf.fps, hf.max_duration)


def test_frames_without_fps_and_missing_pyav(processor, monkeypatch, tmp_path):
    from glm4v_ms.processing.media import UnreadableMediaError
    with pytest.raises(UnreadableMediaError, match="fps"):
        processor(text="<|video|>", videos=[[_frame(0), _frame(1)]])
    path = _write_clip(str(tmp_path / "c.avi"), "rawvideo", "bgr24", frames=4)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install av==") as err:
        processor(text="<|video|>", videos=[path])
    assert path in str(err.value)
