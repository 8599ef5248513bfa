"""tools/convert.py and glm4v_ms.apps.convert: HF folder -> converted folder that from_pretrained loads directly.

Sources are sharded bf16 checkpoints (as the real model is published), re-saved here from the tiny reference model.
Checked: exact equality of the loaded parameters and logits with the HF folder, the written files (layout of q/k
only changed, dtypes kept, index, config marker, copied files), refusals (converted or GPTQ source, existing DST,
bad tensors) that write nothing, atomicity under failures and Ctrl-C, --verify, the CLI, and peak memory.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import mindspore as ms
from reference import image_prompt, pixels, tiny_config_dict
from glm4v_ms import CheckpointError, Glm4vConfig, Glm4vForConditionalGeneration
from glm4v_ms.apps import convert as conv
from glm4v_ms.model.config import CONVERTED_LAYOUT, LAYOUT_KEY
from glm4v_ms.progress import Progress, format_bytes, format_duration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTIED = dict(merge=2, tie=False, partial=0.5, mrope=(2, 3, 3))
BF16 = ml_dtypes.bfloat16
INDEX = "model.safetensors.index.json"
# Files besides config.json and weights that the sources carry; hidden ones must not be copied.
EXTRA_FILES = {"tokenizer.json": '{"model": "tiny"}\n', "chat_template.jinja": "{{ messages }}\n",
               "README.md": "# tiny\n", os.path.join("assets", "note.txt"): "kept\n"}
HIDDEN_FILES = {".gitattributes": "*.safetensors filter=lfs\n", os.path.join(".cache", "junk"): "x\n",
                os.path.join("assets", ".hidden"): "x\n"}
QK = ("q_proj", "k_proj")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def save_sharded(tensors, folder, n_shards, metadata=None):
    """Write ``tensors`` (name -> array, in order) as ``n_shards`` safetensors files plus the HF index."""
    names = list(tensors)
    bounds = np.linspace(0, len(names), n_shards + 1).astype(int)
    weight_map, total = {}, 0
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {k: tensors[k] for k in names[bounds[i]:bounds[i + 1]]}
        save_file(chunk, os.path.join(folder, fname), metadata=metadata or {"format": "pt"})
        weight_map.update({k: fname for k in chunk})
        total += sum(v.nbytes for v in chunk.values())
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_files(folder, files):
    for rel, text in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def header(path):
    """(safetensors header dict, byte offset where the data starts)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def read_all(folder):
    """name -> (safetensors dtype string, array) of every tensor listed in the folder's index."""
    with open(os.path.join(folder, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for name, fname in weight_map.items():
        with safe_open(os.path.join(folder, fname), framework="numpy") as f:
            out[name] = (f.get_slice(name).get_dtype(), f.get_tensor(name))
    return out


def is_decoder_qk(name):
    return name.startswith("model.language_model.") and ".self_attn." in name and name.split(".")[-2] in QK


def listing(folder):
    return sorted(os.listdir(folder))


def edit_source(folder, fn):
    """Apply ``fn(tensors)`` to the source's tensors and re-save them (3 shards + index)."""
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, f)))
            os.remove(os.path.join(folder, f))
    fn(tensors)
    save_sharded(tensors, folder, 3)


@pytest.fixture(scope="module")
def hf_bf16(ref_models, tmp_path_factory):
    """The tiny untied reference model re-saved as a 3-shard bf16 HF folder with tokenizer-like and hidden files."""
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    out = str(tmp_path_factory.mktemp("hf_bf16") / "hf")
    os.makedirs(out)
    for f in os.listdir(folder):
        if f.endswith(".json") and f != INDEX:
            shutil.copy(os.path.join(folder, f), out)
    tensors = {k: v.astype(BF16) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    save_sharded(tensors, out, 3)
    write_files(out, EXTRA_FILES)
    write_files(out, HIDDEN_FILES)
    return out


@pytest.fixture
def src(hf_bf16, tmp_path):
    """A private copy of the bf16 source that a test may damage."""
    dst = str(tmp_path / "src")
    shutil.copytree(hf_bf16, dst)
    return dst


def convert(src, dst, **kw):
    kw.setdefault("shard_size", "100KB")
    kw.setdefault("progress", False)
    return conv.convert_checkpoint(src, dst, **kw)


# ----------------------------------------------------------------------------------------------------------------
# 1. a sharded bf16 folder converts; the result loads to the same parameters and logits
# ----------------------------------------------------------------------------------------------------------------

def test_convert_sharded_bf16_folder(hf_bf16, tmp_path):
    dst = str(tmp_path / "converted")
    s = convert(hf_bf16, dst, shard_size="100KB")
    ref = Glm4vForConditionalGeneration.from_pretrained(hf_bf16)
    ours = Glm4vForConditionalGeneration.from_pretrained(dst)
    names = [n for n, _ in ref.parameters_and_names()]
    assert s["tensors"] == len(names) and s["shards"] >= 4 and s["verified"] is False and s["dropped"] == []

    # Loading the converted folder gives exactly the parameters of loading the HF folder, and the same logits.
    theirs = dict(ref.parameters_and_names())
    for name, p in ours.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), theirs[name].asnumpy(), err_msg=name)
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6)]
    ids = np.array([image_prompt(rng, grids, 2)])
    pv = pixels(rng, grids)
    logits = [m(input_ids=ids, pixel_values=pv, image_grid_thw=np.array(grids)).logits.asnumpy() for m in (ours, ref)]
    assert np.array_equal(logits[0], logits[1])

    # Tensors: only the decoder's q/k (weight and bias) change, into checkpoint_transform's layout; bf16 is kept.
    source, out = read_all(hf_bf16), read_all(dst)
    assert set(out) == set(source) == set(names)
    changed = set()
    for name, (dtype, arr) in out.items():
        assert dtype == "BF16" and arr.dtype == BF16, name
        src_arr = source[name][1]
        np.testing.assert_array_equal(arr.view(np.uint16), ours.checkpoint_transform(name, src_arr).view(np.uint16),
                                      err_msg=name)
        if not np.array_equal(arr.view(np.uint16), src_arr.view(np.uint16)):
            changed.add(name)
    assert changed == {n for n in names if is_decoder_qk(n)} and len(changed) == 8  # 2 layers x q/k x weight/bias

    # Shards and index: names, sizes under the limit, total_size, the weight_map points at the file holding each.
    with open(os.path.join(dst, INDEX)) as f:
        index = json.load(f)
    n = s["shards"]
    shard_files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(f for f in os.listdir(dst) if f.endswith(".safetensors")) == shard_files
    total = 0
    for fname in shard_files:
        hdr, start = header(os.path.join(dst, fname))
        assert hdr.pop("__metadata__") == {"format": "glm4v_ms", "layout": CONVERTED_LAYOUT}
        size = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in hdr.values())
        assert size <= 100_000 or len(hdr) == 1
        assert os.path.getsize(os.path.join(dst, fname)) == start + size
        assert all(index["weight_map"][k] == fname for k in hdr)
        total += size
    assert index["metadata"]["total_size"] == total == s["bytes"] == sum(a.nbytes for _, a in out.values())
    assert set(index["weight_map"]) == set(names)

    # config.json: the source's values plus the marker; the other files copied byte for byte, hidden ones not.
    with open(os.path.join(hf_bf16, "config.json")) as f:
        cfg_src = json.load(f)
    with open(os.path.join(dst, "config.json")) as f:
        cfg_out = json.load(f)
    marker = cfg_out.pop(LAYOUT_KEY)
    assert cfg_out == cfg_src
    assert marker == {"layout": CONVERTED_LAYOUT, "glm4v_ms_version": __import__("glm4v_ms").__version__,
                      "source_format": "hf"}
    assert Glm4vConfig.from_pretrained(dst).converted and not Glm4vConfig.from_pretrained(hf_bf16).converted
    for rel in list(EXTRA_FILES) + ["generation_config.json"]:
        with open(os.path.join(hf_bf16, rel), "rb") as a, open(os.path.join(dst, rel), "rb") as b:
            assert a.read() == b.read(), rel
    for rel in HIDDEN_FILES:
        assert not os.path.exists(os.path.join(dst, rel)), rel
    assert sorted(s["copied"]) == sorted({"README.md", "assets", "chat_template.jinja", "generation_config.json",
                                          "tokenizer.json"})
    assert [f for f in listing(tmp_path) if f.startswith(".")] == []  # no temporary folder left


def test_transformers_refuses_a_converted_folder(hf_bf16, tmp_path):
    """The shards' metadata format is not "pt": transformers must not load permuted q/k rows as if they were its own."""
    from transformers import Glm4vForConditionalGeneration as HF

    dst = str(tmp_path / "converted")
    convert(hf_bf16, dst)
    with pytest.raises(OSError, match="does not contain the valid metadata"):
        HF.from_pretrained(dst)


def test_tied_lm_head_is_dropped(ref_models, tmp_path):
    folder, _ = ref_models("tied", seed=7, merge=2, tie=True, partial=0.5, mrope=(2, 3, 3))
    src = str(tmp_path / "tied")
    os.makedirs(src)
    shutil.copy(os.path.join(folder, "config.json"), src)
    tensors = {k: v.astype(BF16) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].copy()  # some writers keep it
    save_sharded(tensors, src, 2)
    dst = str(tmp_path / "out")
    s = convert(src, dst)
    assert s["dropped"] == ["lm_head.weight"]
    assert "lm_head.weight" not in read_all(dst)
    a = dict(Glm4vForConditionalGeneration.from_pretrained(src).parameters_and_names())
    for name, p in Glm4vForConditionalGeneration.from_pretrained(dst).parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), a[name].asnumpy(), err_msg=name)


def test_single_file_fp32_source_keeps_fp32(ref_models, tmp_path):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    dst = str(tmp_path / "out")
    s = convert(folder, dst, shard_size="5GB")
    assert s["shards"] == 1 and os.listdir(dst).count("model-00001-of-00001.safetensors") == 1
    sd = ref.state_dict()
    model = Glm4vForConditionalGeneration.from_pretrained(dst)
    for name, (dtype, arr) in read_all(dst).items():
        assert dtype == "F32", name
    for name, p in model.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), model.checkpoint_transform(name, sd[name].numpy()), err_msg=name)


def test_parse_size_and_plan():
    assert conv.parse_size("5GB") == 5 * 10**9 and conv.parse_size("500MB") == 5 * 10**8
    assert conv.parse_size("2000000") == conv.parse_size(2000000) == conv.parse_size("2000000 bytes") == 2 * 10**6
    assert conv.parse_size("1.5GB") == 1_500_000_000 and conv.parse_size("4GiB") == 4 * 2**30
    assert conv.parse_size("100kb") == 100_000
    for bad in ("", "5 parsecs", "-1GB", "0", "GB", True):
        with pytest.raises(ValueError, match="shard size"):
            conv.parse_size(bad)
    T = conv.TensorInfo
    ts = [T("a", "f", "BF16", (10,)), T("b", "f", "F32", (10,)), T("big", "f", "BF16", (100,)), T("c", "f", "U8", (5,))]
    assert [[t.name for t in s] for s in conv.plan_shards(ts, 60)] == [["a", "b"], ["big"], ["c"]]
    assert [[t.name for t in s] for s in conv.plan_shards(ts, 1000)] == [["a", "b", "big", "c"]]


# ----------------------------------------------------------------------------------------------------------------
# 2., 3., 6. refusals: nothing is written
# ----------------------------------------------------------------------------------------------------------------

def test_converted_and_gptq_sources_are_refused(hf_bf16, src, tmp_path):
    converted = str(tmp_path / "converted")
    convert(hf_bf16, converted)
    before = listing(tmp_path)
    with pytest.raises(ValueError, match="already a converted glm4v_ms folder; load it directly with from_pretrained"):
        convert(converted, str(tmp_path / "again"))
    assert listing(tmp_path) == before

    cfg_path = os.path.join(src, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="GPTQ folders are loaded directly by from_pretrained"):
        convert(src, str(tmp_path / "gptq_out"))
    assert listing(tmp_path) == before


def test_existing_dst_needs_force(hf_bf16, tmp_path):
    dst = tmp_path / "out"
    convert(hf_bf16, str(dst))
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        convert(hf_bf16, str(dst))
    assert (dst / "keep.txt").read_text() == "old"
    convert(hf_bf16, str(dst), force=True)  # an earlier conversion: --force replaces it
    assert not (dst / "keep.txt").exists() and (dst / INDEX).exists()
    assert [f for f in listing(tmp_path) if f.startswith(".")] == []  # neither the temp nor the old folder remains
    assert not (dst / conv.OWNER_FILE).exists()
    Glm4vForConditionalGeneration.from_pretrained(str(dst))


def test_force_never_replaces_a_folder_that_is_not_a_conversion(hf_bf16, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="is not a folder written by tools/convert.py"):
            convert(hf_bf16, str(dst), force=force)
    assert listing(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
    assert listing(tmp_path) == ["out"]


def test_bad_paths(hf_bf16, tmp_path):
    with pytest.raises(FileNotFoundError, match="SRC folder not found: .*nope"):
        convert(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="same folder as SRC"):
        convert(hf_bf16, hf_bf16, force=True)
    with pytest.raises(ValueError, match="inside SRC"):
        convert(hf_bf16, os.path.join(hf_bf16, "sub"))
    with pytest.raises(ValueError, match="SRC .* is inside DST"):
        convert(hf_bf16, os.path.dirname(hf_bf16), force=True)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    ("unknown", r"unexpected tensors .*model\.visual\.blocks\.0\.attn\.qkv\.bias"),
    ("missing", r"missing tensors: model\.language_model\.layers\.1\.mlp\.down_proj\.weight"),
    ("shape", r"shape mismatch: model\.visual\.blocks\.0\.attn\.qkv\.weight \(checkpoint \[143, 48\]"),
    ("shard", r"lists shard\(s\) that are not in .*: model-00002-of-00003\.safetensors"),
])
def test_bad_tensors_are_named_and_nothing_written(src, tmp_path, damage, message):
    if damage == "unknown":
        edit_source(src, lambda t: t.__setitem__("model.visual.blocks.0.attn.qkv.bias", np.zeros(144, BF16)))
    elif damage == "missing":
        edit_source(src, lambda t: t.pop("model.language_model.layers.1.mlp.down_proj.weight"))
    elif damage == "shape":
        key = "model.visual.blocks.0.attn.qkv.weight"
        edit_source(src, lambda t: t.__setitem__(key, t[key][:-1]))
    else:
        os.remove(os.path.join(src, "model-00002-of-00003.safetensors"))
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        convert(src, str(tmp_path / "out"))
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------
# 4. atomicity: a failure half-way leaves neither DST nor a temporary folder; an old DST survives
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_halfway_leaves_nothing(hf_bf16, tmp_path, monkeypatch, exc, existing):
    dst = tmp_path / "out"
    if existing:  # an earlier conversion, which --force may replace
        convert(hf_bf16, str(dst))
        (dst / "keep.txt").write_text("old")
        kept = listing(dst)
    real, calls = conv.write_shard, []

    def failing(path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:
            # the shard is half-written when the failure comes
            with open(path, "wb") as f:
                f.write(b"partial")
            raise exc
        return real(path, *args, **kw)

    monkeypatch.setattr(conv, "write_shard", failing)
    before = listing(tmp_path)
    with pytest.raises(type(exc)):
        convert(hf_bf16, str(dst), force=existing)
    assert len(calls) == 2 and os.path.dirname(calls[0]) != str(dst)  # it was writing into a temporary folder
    assert listing(tmp_path) == before  # no DST (or the old one only) and no temporary folder
    if existing:
        assert listing(dst) == kept and (dst / "keep.txt").read_text() == "old"


# ----------------------------------------------------------------------------------------------------------------
# 5. --verify
# ----------------------------------------------------------------------------------------------------------------

def _corrupting_writer(monkeypatch, victims):
    """Wrap write_shard so that the 2nd shard written gets one byte of its first tensor flipped on disk, as a bad
    disk or a bug in the writer would do; the victim's name is appended to ``victims``."""
    real, calls = conv.write_shard, []

    def writer(path, *args, **kw):
        real(path, *args, **kw)
        calls.append(path)
        if len(calls) == 2:
            hdr, start = header(path)
            hdr.pop("__metadata__", None)
            name, entry = min(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0])
            with open(path, "r+b") as f:
                f.seek(start + entry["data_offsets"][0] + 1)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0x10]))
            victims.append(name)

    monkeypatch.setattr(conv, "write_shard", writer)


def test_verify_passes_and_catches_a_corrupted_write(hf_bf16, tmp_path, monkeypatch):
    s = convert(hf_bf16, str(tmp_path / "ok"), verify=True)
    assert s["verified"] is True

    victims = []
    _corrupting_writer(monkeypatch, victims)
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match="verification failed: tensor '(.+)' in model-00002-of-.*differs") as e:
        convert(hf_bf16, str(tmp_path / "bad"), verify=True)
    assert victims and f"'{victims[0]}'" in str(e.value)
    assert listing(tmp_path) == before
    # Without --verify the same corruption goes unnoticed: the check above is what catches it.
    monkeypatch.undo()
    victims.clear()
    _corrupting_writer(monkeypatch, victims)
    convert(hf_bf16, str(tmp_path / "unverified"))
    assert len(victims) == 1


# ----------------------------------------------------------------------------------------------------------------
# 7. the command line
# ----------------------------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_cli(hf_bf16, tmp_path):
    dst = str(tmp_path / "out")
    p = _cli(hf_bf16, dst, "--shard_size", "200KB", "--verify")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"converted {hf_bf16} -> {dst}: ") and "verified" in p.stdout
    assert len(p.stdout.strip().splitlines()) == 1
    # stderr is not a terminal: plain progress lines, the last ones at 100%
    assert "converting: " in p.stderr and "100.0%" in p.stderr and "\r" not in p.stderr
    assert Glm4vConfig.from_pretrained(dst).converted

    for args, message in [((str(tmp_path / "nope"), str(tmp_path / "x")), "SRC folder not found"),
                          ((hf_bf16, dst), "already exists; pass --force"),
                          ((dst, str(tmp_path / "y")), "already a converted glm4v_ms folder"),
                          ((hf_bf16, str(tmp_path / "z"), "--shard_size", "lots"), "is not a size")]:
        p = _cli(*args, "--no_progress")
        assert p.returncode == 1, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, p.stderr)
        assert "Traceback" not in p.stderr and p.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------------------------------------------
# the progress bar
# ----------------------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeTTY:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_plain_stream_prints_rarely_and_at_the_end():
    import io

    clock, out = FakeClock(), io.StringIO()
    bar = Progress(total=4 * 10**9, unit="B", desc="converting", stream=out, clock=clock)
    for _ in range(8):
        clock.t += 1.0
        bar.update(10**8, shard="1/4")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # 8 s of updates, one line every 5 s
    assert lines[0] == "converting: 500 MB/4 GB  12.5% | 100 MB/s | ETA 0:35 | shard=1/4"
    clock.t += 1.0  # t = 9 s: 4 s since the last line, too early for another
    bar.update(32 * 10**8, shard="4/4")
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1] == "converting: 4 GB/4 GB 100.0% | 444 MB/s | in 0:09 | shard=4/4"


def test_progress_tty_redraws_one_line_and_counts_requests():
    clock, tty = FakeClock(), FakeTTY()
    bar = Progress(total=80, unit="requests", desc="batch", stream=tty, clock=clock)
    for i in range(80):
        clock.t += 1 / 32  # exact in binary: 2.5 s in all
        bar.update(1)
    bar.close()
    draws = tty.text.split("\r")[1:]
    # redrawn at most 10 times a second: every 4th update (0.125 s), plus the first and the final line
    assert len(draws) == 20 + 2
    assert tty.text.count("\n") == 1 and tty.text.endswith("\n")
    assert draws[10].startswith("batch: 40/80 requests  50.0% | 32 requests/s | ETA 0:01")
    assert draws[-1].startswith("batch: 80/80 requests 100.0% | 32 requests/s | in 0:02")
    silent = FakeTTY()
    b = Progress(total=3, stream=silent, enabled=False, clock=clock)
    b.update(3)
    b.close()
    assert silent.text == "" and b.n == 3


def test_progress_formatting():
    assert format_bytes(999) == "999 B" and format_bytes(1234567) == "1.23 MB" and format_bytes(18e9) == "18 GB"
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
    clock = FakeClock()
    bar = Progress(total=None, unit="requests", stream=FakeTTY(), enabled=False, clock=clock)
    clock.t += 2
    bar.update(3)
    assert bar.format() == "3 requests | 1.5 requests/s"


# ----------------------------------------------------------------------------------------------------------------
# 8. peak memory of converting and of loading the converted folder
# ----------------------------------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    os.environ["GLOG_v"] = "3"
    import mindspore as ms
    import glm4v_ms
    from glm4v_ms import Glm4vForConditionalGeneration
    from glm4v_ms.apps.convert import convert_checkpoint

    glm4v_ms.set_device("CPU")

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def reset_peak():  # VmHWM := current RSS (Linux >= 4.0), so the import's own peak does not count
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    mode, src, dst = sys.argv[2:5]
    reset_peak()
    base = status("VmRSS")
    if mode == "convert":
        convert_checkpoint(src, dst, verify=True, shard_size="60MB", progress=False)
        held = 0
    else:
        model = Glm4vForConditionalGeneration.from_pretrained(dst, dtype=ms.bfloat16)
        held = sum(2 * int(p.size) for _, p in model.parameters_and_names())  # bf16 parameters
    print(json.dumps({"base": base, "peak": status("VmHWM"), "held": held}))
""")


def _memory_config():
    """A 0.16B-parameter GLM-4.1V-shaped model: width 1024, GQA 8:2 with head_dim 128 as in the real model, 8 decoder
    layers, MLP 4096, a 16384-token vocabulary, so that the largest tensor (34 MB) is about the same fraction of a
    shard as the real model's (1.24 GB embedding, 5 GB shards)."""
    cfg = tiny_config_dict(merge=2, tie=False, partial=0.5, mrope=(8, 12, 12), text_layers=8, vision_depth=2,
                           hidden=1024, heads=8, kv_heads=2, vision_hidden=256, vision_heads=4)
    cfg["text_config"].update(vocab_size=16384, intermediate_size=4096)
    return cfg


def test_peak_memory_of_conversion_and_loading(tmp_path):
    """Peak RSS above the RSS just before the call, each measured in a fresh subprocess:

    * conversion (with --verify): below 2 x the largest source shard + 64 MB;
    * from_pretrained(converted, bf16): minus the parameters it keeps, below 2 x the largest source shard + 64 MB.

    The ~305 MiB bf16 checkpoint is in 6 shards of <= 60 MB (bound ~178 MiB), so a converter holding the model, or an
    output shard plus a serialised copy of it plus the mapped source shard, fails. The streaming converter holds
    about 3 tensors at its worst moment (verify: the written one, and the source one while its file is mapped)."""
    cfg = _memory_config()
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "config.json", "w") as f:
        json.dump(cfg, f)
    model = Glm4vForConditionalGeneration(Glm4vConfig.from_dict(cfg), ms.bfloat16)  # lazy: names and shapes only
    rng = np.random.default_rng(0)
    shards, cur, size, limit, data_bytes = [], {}, 0, 60 * 10**6, 0
    for name, p in model.parameters_and_names():
        n = int(np.prod(p.shape))
        if cur and size + 2 * n > limit:
            shards.append(cur)
            cur, size = {}, 0
        # random bf16 bit patterns with the top exponent bit cleared: finite values of magnitude < 2
        cur[name] = (rng.integers(0, 1 << 16, size=n, dtype=np.uint16) & 0xBFFF).view(BF16).reshape(tuple(p.shape))
        size += 2 * n
        data_bytes += 2 * n
    shards.append(cur)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    shards.clear()
    with open(src / INDEX, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    shard_sizes = [os.path.getsize(src / f) for f in sorted(set(weight_map.values()))]
    total, largest = sum(shard_sizes), max(shard_sizes)
    bound = 2 * largest + 64 * 2**20
    assert 5 <= len(shard_sizes) <= 7 and total > 300 * 10**6 and total > bound + 100 * 10**6

    dst = tmp_path / "dst"
    figures = {}
    for mode in ("convert", "load"):
        p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, ROOT, mode, str(src), str(dst)], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        figures[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    conv_extra = figures["convert"]["peak"] - figures["convert"]["base"]
    load_extra = figures["load"]["peak"] - figures["load"]["base"] - figures["load"]["held"]
    print(f"\n[memory] checkpoint {total * mb:.0f} MiB in {len(shard_sizes)} shards, largest {largest * mb:.0f} MiB, "
          f"bound {bound * mb:.0f} MiB; conversion (with verify) peak extra {conv_extra * mb:.0f} MiB; loading peak "
          f"extra {load_extra * mb:.0f} MiB beyond the {figures['load']['held'] * mb:.0f} MiB of parameters")
    assert figures["load"]["held"] == data_bytes  # every parameter loaded, in bf16
    assert conv_extra < bound, f"conversion used {conv_extra * mb:.0f} MiB extra, bound {bound * mb:.0f} MiB"
    assert load_extra < bound, f"loading used {load_extra * mb:.0f} MiB beyond the parameters, bound {bound * mb:.0f}"
    shutil.rmtree(src)
    shutil.rmtree(dst)
