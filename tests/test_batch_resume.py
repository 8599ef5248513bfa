"""tools/batch_infer.py: resume reuses a result only for the identical request; existing outputs that are not ours
are refused; invalid lines (surrogates, a PDF as image, missing files) are errors found before the model loads.

End-to-end runs are subprocesses on the tiny random model (greedy, eager, 4 new tokens) in one data folder; the
resume tests run in order on one output, each changing one thing.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.apps.batch import (FORMAT, BatchJob, JobError, JobOptions, PartStore, make_layout, model_identity,
                            plan_resume, scan_input)
from glm4v_ms.apps.tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "batch_infer.py")
GEN = ["--greedy", "--max_new_tokens", "4", "--mode", "eager"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("resume") / "tiny"))


def _image(path, seed, size=(56, 84)):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random(size + (3,)) * 255).astype("uint8")).save(path)


def _write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def run_tool(cwd, *args, timeout=300):
    env = dict(os.environ, GLOG_v="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_id(path):
    return {x["id"]: x for x in read_jsonl(path)}


LINES = [{"id": "q1", "prompt": "Describe the picture.", "image": "a.png"},
         {"id": "q2", "prompt": "What colour dominates?", "image": "b.png"},
         {"id": "t1", "prompt": "Tell me a story."},
         {"id": "t2", "prompt": "Count to three."}]


@pytest.fixture(scope="module")
def job(tiny, tmp_path_factory):
    """A data folder, its first complete run, and a runner for the reruns (same input path and output)."""
    d = tmp_path_factory.mktemp("resume_data")
    _image(d / "a.png", 1)
    _image(d / "b.png", 2)
    _write_lines(d / "in.jsonl", LINES)

    def run(*extra):
        return run_tool(d, "--input", "in.jsonl", "--output", "out.jsonl", "--model_name", tiny, *GEN, *extra)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "4 done before" not in first.stderr and "0 done before this run, 4 to do" in first.stderr
    return d, run


def _rerun_recomputes(run, d, expect_ids, extra=()):
    """Rerun; the requests ``expect_ids`` are recomputed (named in the log) and the others reused byte for byte."""
    before = {x["id"]: x for x in read_jsonl(d / "out.jsonl")}
    r = run(*extra)
    assert r.returncode == 0, r.stderr
    n = len(expect_ids)
    assert f"{len(LINES) - n} done before this run, {n} to do" in r.stderr, r.stderr
    if n:
        assert f"{n} request(s) changed since their earlier result" in r.stderr, r.stderr
        for rid in expect_ids:
            assert repr(rid) in r.stderr
        assert f"({n} recomputed because the request changed)" in r.stdout, r.stdout
    out = read_jsonl(d / "out.jsonl")
    assert [x["id"] for x in out] == [x["id"] for x in LINES]  # each id once, input order
    for x in out:
        assert x["format"] == FORMAT
        if x["id"] not in expect_ids:
            assert x == before[x["id"]], f"{x['id']} should have been reused"
        else:
            assert x["request_digest"] != before[x["id"]]["request_digest"]
    return before, {x["id"]: x for x in out}, r


def test_edited_prompt_is_recomputed(job):
    d, run = job
    lines = [dict(x) for x in LINES]
    lines[2]["prompt"] = "Tell me a much longer story about a lighthouse keeper and the sea, please."
    _write_lines(d / "in.jsonl", lines)
    LINES[:] = lines
    before, after, _ = _rerun_recomputes(run, d, ["t1"])
    # the old answer to the old question must not come back: the new record is of the new (longer) prompt
    assert after["t1"]["prompt_tokens"] > before["t1"]["prompt_tokens"]


def test_replaced_image_is_recomputed(job):
    d, run = job
    _image(d / "b.png", 7, size=(84, 56))  # same name, other picture (and size)
    _, after, _ = _rerun_recomputes(run, d, ["q2"])
    assert after["q2"]["new_tokens"] >= 1


def test_changed_setting_is_recomputed_unless_it_cannot_change_the_answer(job):
    d, run = job
    # greedy: the sampling knobs do not change the answer, so nothing is redone
    _rerun_recomputes(run, d, [], extra=("--temperature", "0.3", "--top_k", "7"))
    # a per-line setting of one request
    lines = [dict(x) for x in LINES]
    lines[0]["max_new_tokens"] = 2
    _write_lines(d / "in.jsonl", lines)
    LINES[:] = lines
    _, after, _ = _rerun_recomputes(run, d, ["q1"])
    assert after["q1"]["new_tokens"] <= 2
    # a job setting that changes every answer
    _rerun_recomputes(run, d, [x["id"] for x in LINES], extra=("--repetition_penalty", "1.3"))


def test_results_without_digest_are_recomputed(job):
    """Records of the first version (no request_digest) are stale: recomputed, and the log says why."""
    d, run = job
    parts = d / "out.jsonl.parts" / "rank-0.jsonl"
    old = []
    for x in read_jsonl(parts):
        x.pop("request_digest"), x.pop("format")
        old.append(json.dumps(x))
    parts.write_text("\n".join(old) + "\n")
    r = run("--repetition_penalty", "1.3")
    assert r.returncode == 0, r.stderr
    assert "0 done before this run, 4 to do" in r.stderr
    assert "4 request(s) have only results without a request digest" in r.stderr
    out = read_jsonl(d / "out.jsonl")
    assert [x["id"] for x in out] == [x["id"] for x in LINES] and all("request_digest" in x for x in out)


def test_stale_record_of_another_id_is_not_reused(tmp_path):
    """A record for a line whose id (or digest) differs is stale, never chosen; without one the request is new."""
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "prompt": "z"}])
    idx = scan_input(str(src))
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    recs = [{"id": "a", "index": 0, "answer": "A", "request_digest": "d0"},
            {"id": "other", "index": 1, "answer": "B", "request_digest": "d1"},
            {"id": "c", "index": 2, "answer": "C", "request_digest": "old"},
            {"id": "zz", "index": 9, "answer": "beyond the input", "request_digest": "d9"}]
    (parts / "rank-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    store = PartStore(str(parts), {0: ("a", "d0"), 1: ("b", "d1"), 2: ("c", "d2")})
    store.poll()
    plan = plan_resume(idx, store, retry_errors=False)
    assert plan.reused == [0] and plan.changed == [1, 2] and plan.new == []


# -------------------------------------------------------------------------------------------- existing output
@pytest.mark.parametrize("content", [b"my notes, not results\n", b'{"a": 1}\n{"b": 2}\n',
                                     json.dumps({"id": 1, "index": 0, "format": FORMAT}).encode() + b"\nmine\n"])
def test_unrelated_output_is_refused_and_untouched(tiny, tmp_path, content):
    _write_lines(tmp_path / "in.jsonl", [{"id": "t", "prompt": "hello"}])
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    r = run_tool(tmp_path, "--input", "in.jsonl", "--output", "notes.jsonl", "--model_name", tiny, *GEN)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --output notes.jsonl exists and is not a results file"), \
        r.stderr
    assert out.read_bytes() == content
    assert not (tmp_path / "notes.jsonl.parts").exists()  # nothing written at all


def test_own_and_empty_outputs_are_accepted(tmp_path):
    from glm4v_ms.apps.batch import check_output

    (tmp_path / "empty.jsonl").write_bytes(b"")
    check_output(str(tmp_path / "empty.jsonl"))
    (tmp_path / "v1.jsonl").write_text(json.dumps({"id": 0, "index": 0, "error": "x"}) + "\n")
    check_output(str(tmp_path / "v1.jsonl"))  # a result file of the first version (before the marker)
    with pytest.raises(JobError, match="folder"):
        check_output(str(tmp_path))


# ------------------------------------------------------------------------------------------------ invalid lines
BAD_LINES = ['{"id": "sur", "prompt": "a lone \\ud800 surrogate"}',
             '{"id": "sur-id-\\udc80", "prompt": "fine", "image": "missing.png"}',
             {"id": "pdfimg", "prompt": "Read it.", "image": "doc.pdf"},
             {"id": "missing", "prompt": "x", "image": ["a.png", "nope.png"]},
             {"id": "dir", "prompt": "x", "video": "sub"},
             {"id": "empty", "prompt": "x", "image": "empty.png"},
             {"id": "settings", "prompt": "x", "do_sample": True, "temperature": 0},
             {"id": "field", "prompt": "x", "colour": "red"},
             {"id": "nul", "prompt": "x", "image": "a\u0000.png"},
             '{"id": "json", "prompt": ']


def _bad_data(d):
    _image(d / "a.png", 3)
    (d / "doc.pdf").write_bytes(b"%PDF-1.4\n% a PDF document given as an image\n")
    (d / "empty.png").write_bytes(b"")
    (d / "sub").mkdir()
    _write_lines(d / "bad.jsonl", BAD_LINES)


def test_only_bad_lines_never_load_the_model(tiny, tmp_path):
    """Every line is invalid: each gets its error result, the job exits 0, and the model is never loaded."""
    _bad_data(tmp_path)
    r = run_tool(tmp_path, "--input", "bad.jsonl", "--output", "bad_out.jsonl", "--model_name", tiny, *GEN)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "loading the model" not in r.stderr
    out = read_jsonl(tmp_path / "bad_out.jsonl")
    assert len(out) == len(BAD_LINES) and all("error" in x and x["format"] == FORMAT for x in out)
    err = {x["id"]: x["error"] for x in out}
    assert "lone UTF-16 surrogate (\\ud800" in err["sur"] and "'prompt'" in err["sur"]
    assert "missing.png: no such file" in err["sur-id-\udc80"]  # an id with a surrogate is kept, \\u-escaped
    assert "doc.pdf is a PDF document; give it in the 'pdf' field" in err["pdfimg"]
    assert "nope.png: no such file" in err["missing"]
    assert "video sub: is a folder" in err["dir"]
    assert "empty.png: file is empty" in err["empty"]
    assert "temperature must be > 0" in err["settings"]
    assert "unknown field 'colour'" in err["field"]
    assert "cannot read it (embedded null byte)" in err["nul"]
    assert "invalid JSON" in err[9]
    # the log names each invalid request
    assert "[request 'pdfimg' (line 2): error: image doc.pdf is a PDF document" in r.stderr
    # a rerun reuses the error results (the lines did not change) and loads nothing either
    again = run_tool(tmp_path, "--input", "bad.jsonl", "--output", "bad_out.jsonl", "--model_name", tiny, *GEN)
    assert again.returncode == 0 and f"{len(BAD_LINES)} done before this run, 0 to do" in again.stderr


def test_invalid_lines_are_written_before_the_model_loads(tiny, tmp_path):
    """In the library: the error records of invalid lines are in the part file before load_pipeline() is called;
    with only invalid lines it is never called."""
    _bad_data(tmp_path)
    events = []

    def load_pipeline():
        events.append(open(tmp_path / "o.jsonl.parts" / "rank-0.jsonl").read().count("\n"))
        raise RuntimeError("stop here")

    opts = dict(output=str(tmp_path / "o.jsonl"), model_identity=model_identity(tiny, {}), progress=False,
                settings={"do_sample": False, "max_new_tokens": 4})
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the lines' relative paths
    try:
        BatchJob(JobOptions(input="bad.jsonl", **opts), make_layout(0, 1), load_pipeline, log=lambda s: None).run()
        assert events == [] and len(read_jsonl(tmp_path / "o.jsonl")) == len(BAD_LINES)
        _write_lines(tmp_path / "mixed.jsonl", BAD_LINES + [{"id": "good", "prompt": "hello"}])
        with pytest.raises(RuntimeError, match="stop here"):
            BatchJob(JobOptions(input="mixed.jsonl", **opts), make_layout(0, 1), load_pipeline,
                     log=lambda s: None).run()
        assert events == [len(BAD_LINES)]
    finally:
        os.chdir(cwd)


def test_bad_job_settings_are_one_job_error(tiny, tmp_path):
    _write_lines(tmp_path / "in.jsonl", [{"id": "t", "prompt": "hello"}])
    r = run_tool(tmp_path, "--input", "in.jsonl", "--output", "o.jsonl", "--model_name", tiny, "--temperature", "0")
    # the flag's range is checked by argparse (shared with generate.py): usage, then one error line naming it
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "batch_infer.py: error: argument --temperature: must be > 0, got 0"
    assert not (tmp_path / "o.jsonl").exists()


def test_pdf_as_image_by_url_or_payload_is_refused_when_encoding(tiny, tmp_path):
    """Images that are not local files are read when the request is encoded: a PDF among them is refused like a
    local one (data: URI here; http URLs take the same path), and other images reach the processor as bytes."""
    import base64
    import io

    from glm4v_ms.apps.batch import parse_request
    from glm4v_ms.apps.batch.validate import fetch_remote_images
    from glm4v_ms.processing.media import MediaOptions

    pdf = b"%PDF-1.4\n% not an image\n"
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), "red").save(buf, format="PNG")
    png_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    req = fetch_remote_images(parse_request({"prompt": "x", "image": [png_uri]}, 0), MediaOptions())
    assert req.first_image == buf.getvalue() and req.messages[-1]["content"][0]["image"] == buf.getvalue()
    from glm4v_ms.apps.batch import RequestError

    raw = {"role": "user", "content": [{"type": "image", "base64": base64.b64encode(pdf).decode()},
                                       {"type": "text", "text": "x"}]}
    with pytest.raises(RequestError, match="is a PDF document; give it in the 'pdf' field"):
        fetch_remote_images(parse_request({"messages": [raw]}, 0), MediaOptions())

    pdf_uri = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    _write_lines(tmp_path / "in.jsonl", [{"id": "pdfuri", "prompt": "Read it.", "image": pdf_uri},
                                         {"id": "png", "prompt": "Colour?", "image": png_uri}])
    r = run_tool(tmp_path, "--input", "in.jsonl", "--output", "o.jsonl", "--model_name", tiny, *GEN)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = by_id(tmp_path / "o.jsonl")
    assert "is a PDF document; give it in the 'pdf' field" in out["pdfuri"]["error"]
    assert out["png"]["new_tokens"] >= 1 and out["png"]["boxes_pixels"] == []


# ----------------------------------------------------------------------------------------------- digest parts
def test_digest_ingredients(tiny, tmp_path):
    """What the digest sees: small files by content (a copy elsewhere is the same), large files by real path, size
    and mtime; greedy settings without the sampling knobs, sampled ones with the run mode; the model's files."""
    import shutil

    from glm4v_ms.apps.batch.resume import HASH_BYTES, effective_settings, file_identity

    small = tmp_path / "s.bin"
    small.write_bytes(b"x" * 100)
    (tmp_path / "d").mkdir()
    shutil.copy(small, tmp_path / "d" / "s.bin")
    assert file_identity(str(small)) == file_identity(str(tmp_path / "d" / "s.bin"))
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * (HASH_BYTES + 1))
    ident = file_identity(str(big))
    assert ident[0] == "stat" and ident[2] == HASH_BYTES + 1
    os.utime(big, ns=(0, ident[3] + 10**9))
    assert file_identity(str(big)) != ident
    assert file_identity(str(tmp_path / "nope.png"))[0] == "missing"

    greedy = effective_settings({"do_sample": False, "temperature": 0.5, "top_k": 3, "max_new_tokens": 9}, {}, "graph")
    assert greedy == {"do_sample": False, "max_new_tokens": 9}
    sampled = effective_settings({"do_sample": False, "temperature": 0.5}, {"do_sample": True}, "eager")
    assert sampled == {"do_sample": True, "temperature": 0.5, "mode": "eager"}

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    a = model_identity(str(model), {"dtype": "float32"})
    assert a == model_identity(str(model), {"dtype": "float32"}) != model_identity(str(model), {"dtype": "bfloat16"})
    cfg = model / "generation_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert model_identity(str(model), {"dtype": "float32"}) != a
