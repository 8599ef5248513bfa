"""Loading HF safetensors: single file, sharded index, bf16 files, and strict errors that name the tensor."""

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mindspore as ms
from reference import image_prompt, pixels, rel_err
from glm4v_ms import CheckpointError, Glm4vForConditionalGeneration

UNTIED = dict(merge=2, tie=False, partial=0.5, mrope=(2, 3, 3))


def _copy(folder, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def _edit(dst, fn):
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _assert_loaded_equals(model, ref):
    """Every parameter equals the HF tensor after the model's load transform, and only the decoder's q/k projections
    change (rows permuted per head into the half rotary layout)."""
    permuted = set()
    sd = ref.state_dict()
    for name, p in model.parameters_and_names():
        hf = sd[name].numpy()
        np.testing.assert_array_equal(p.asnumpy(), model.checkpoint_transform(name, hf), err_msg=name)
        if not np.array_equal(p.asnumpy(), hf):
            permuted.add(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1])
    assert permuted == {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"}


def test_parameter_names_are_the_checkpoint_keys(ref_models):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    ours = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    theirs = {n: tuple(p.shape) for n, p in ref.state_dict().items()}
    assert ours == theirs
    _assert_loaded_equals(model, ref)


def test_missing_tensor_is_named(ref_models, tmp_path):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    dst = _copy(folder, tmp_path)
    _edit(dst, lambda t: t.pop("model.language_model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.language_model\.layers\.1\.mlp\.down_proj\.weight"):
        Glm4vForConditionalGeneration.from_pretrained(str(dst))


def test_wrong_shape_is_named(ref_models, tmp_path):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    dst = _copy(folder, tmp_path)
    key = "model.visual.blocks.0.attn.qkv.weight"
    _edit(dst, lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {key.replace('.', '[.]')} \(checkpoint \[143, 48\], model \[144, 48\]\)"):
        Glm4vForConditionalGeneration.from_pretrained(str(dst))


def test_unknown_key_is_named(ref_models, tmp_path):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    dst = _copy(folder, tmp_path)
    _edit(dst, lambda t: t.__setitem__("model.visual.blocks.0.attn.qkv.bias", np.zeros(144, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.visual\.blocks\.0\.attn\.qkv\.bias"):
        Glm4vForConditionalGeneration.from_pretrained(str(dst))


def test_sharded_checkpoint(ref_models, tmp_path):
    _, ref = ref_models("untied", seed=0, **UNTIED)
    dst = tmp_path / "sharded"
    ref.save_pretrained(dst, safe_serialization=True, max_shard_size="100KB")
    shards = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(dst / "model.safetensors.index.json")
    model = Glm4vForConditionalGeneration.from_pretrained(str(dst))
    _assert_loaded_equals(model, ref)
    # A shard listed in the index but absent is named.
    os.remove(dst / shards[0])
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) that are not in .*{shards[0]}"):
        Glm4vForConditionalGeneration.from_pretrained(str(dst))


def test_bf16_checkpoint_cast_to_requested_dtype(ref_models, tmp_path):
    _, ref = ref_models("untied", seed=0, **UNTIED)
    dst = tmp_path / "bf16"
    import copy

    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ref16.save_pretrained(dst, safe_serialization=True)
    sd16 = ref16.state_dict()
    m32 = Glm4vForConditionalGeneration.from_pretrained(str(dst), dtype=ms.float32)
    for name, p in m32.parameters_and_names():
        assert p.dtype == ms.float32
        np.testing.assert_array_equal(p.asnumpy(), m32.checkpoint_transform(name, sd16[name].float().numpy()),
                                      err_msg=name)
    m16 = Glm4vForConditionalGeneration.from_pretrained(str(dst), dtype=ms.bfloat16)
    for name, p in m16.parameters_and_names():
        assert p.dtype == ms.bfloat16
        np.testing.assert_array_equal(p.astype(ms.float32).asnumpy(),
                                      m16.checkpoint_transform(name, sd16[name].float().numpy()), err_msg=name)
    # The bf16 weights, computed in fp32 on both sides, still agree.
    from transformers import Glm4vForConditionalGeneration as HF

    hf32 = HF.from_pretrained(dst, torch_dtype=torch.float32, attn_implementation="eager").eval()
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6)]
    ids = np.array([image_prompt(rng, grids, 2)])
    pv = pixels(rng, grids)
    ours = m32(input_ids=ids, pixel_values=pv, image_grid_thw=np.array(grids)).logits.asnumpy()
    with torch.no_grad():
        theirs = hf32(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv),
                      image_grid_thw=torch.tensor(grids)).logits.numpy()
    assert rel_err(ours, theirs) <= 1e-5


def test_folder_errors(tmp_path, ref_models):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        Glm4vForConditionalGeneration.from_pretrained(str(tmp_path / "nope"))
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    dst = _copy(folder, tmp_path)
    os.remove(dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors or model.safetensors.index.json"):
        Glm4vForConditionalGeneration.from_pretrained(str(dst))
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        Glm4vForConditionalGeneration.from_pretrained(str(dst))
