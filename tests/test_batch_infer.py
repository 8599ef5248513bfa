"""tools/batch_infer.py: batching, msrun data parallelism, crash and resume, per-line errors, part-file repair.

End-to-end runs are subprocesses on the tiny random model (greedy, 6 new tokens). msrun runs with a short
--cluster_time_out on free ports; msrun starts `python` from PATH, so the environment's bin folder goes first.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.apps.batch import (JobError, PartStore, RequestError, collate, make_layout, merge_parts,
                            parse_request, repair_tail, scan_input)
from glm4v_ms.apps.tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "batch_infer.py")
BIN = os.path.dirname(sys.executable)
MSRUN = os.path.join(BIN, "msrun")
GEN = ["--greedy", "--max_new_tokens", "6"]
SAME = ("id", "index", "thinking", "answer", "boxes", "boxes_pixels", "prompt_tokens", "new_tokens",
        "thinking_cut_at", "error")  # what must not depend on batching or sharding (timings do)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("batch") / "tiny"))


def _write_video(path, frames=6, w=56, h=56, seed=0):
    av = pytest.importorskip("av")
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=2)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data set of 24 lines: images of two sizes, text, two videos, a chat-format request, per-request settings,
    a blank line and five bad lines. Paths are relative (the runs' working directory is this folder)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (84, 56)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(d / name)
    (d / "broken.png").write_text("not an image")
    _write_video(d / "v.mp4")
    lines = []
    for k in range(8):
        lines.append({"id": f"img{k}", "prompt": f"Describe picture {k}." + " More detail." * (k % 3),
                      "image": "a.png" if k % 2 else "b.png"})
    for k in range(4):
        lines.append({"id": f"txt{k}", "prompt": "Tell me a story about the number %d." % k + " Please." * k})
    lines.append({"id": "vid0", "prompt": "What happens?", "video": "v.mp4"})
    lines.append({"id": "vid1", "prompt": "What happens in the clip?", "video": "v.mp4"})
    lines.append({"id": "chat", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": "Compare."}]}]})
    lines.append({"id": 42, "prompt": "Short.", "image": ["b.png"], "max_new_tokens": 3})
    lines.append({"prompt": "No id: my id is my line number.", "max_thinking_tokens": 2})
    text = [json.dumps(x) for x in lines]
    text.insert(5, "")                                                     # blank: not a request
    text.append('{"id": "badjson", "prompt": "x"')                         # invalid JSON
    text.append(json.dumps({"id": "nofile", "prompt": "x", "image": "missing.png"}))
    text.append(json.dumps({"id": "corrupt", "prompt": "x", "image": "broken.png"}))
    text.append(json.dumps({"id": "field", "prompt": "x", "colour": "red"}))
    text.append(json.dumps({"id": "txt1", "prompt": "a duplicate id"}))
    (d / "in.jsonl").write_text("\n".join(text) + "\n")
    return d


def _env(**extra):
    env = dict(os.environ, GLOG_v="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_tool(cwd, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_cmd(n, log_dir, *args):
    return [MSRUN, f"--worker_num={n}", f"--local_worker_num={n}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "--join=True", "--cluster_time_out=45", f"--log_dir={log_dir}",
            TOOL, *args]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def part_records(parts_dir):
    """Complete records of every part file: {(file, line number): raw line}."""
    out = {}
    for name in sorted(os.listdir(parts_dir)):
        if name.startswith("rank-"):
            with open(os.path.join(parts_dir, name), "rb") as f:
                for k, raw in enumerate(f):
                    if raw.endswith(b"\n"):
                        out[(name, k)] = raw
    return out


def _valid_lines(path):
    out = []
    for line in open(path, encoding="utf-8"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def same(rec):
    return {k: rec.get(k) for k in SAME}


def expected_requests(data):
    idx = scan_input(str(data / "in.jsonl"))
    return idx.indices, [idx.ids[i] for i in idx.indices]


@pytest.fixture(scope="module")
def single(tiny, data):
    """One process, no msrun, batches of 4: the reference output. Eager mode (graph mode compiles every new batch
    shape, ~4 s each on this machine); test_graph_mode_batch checks that graph mode gives the same results."""
    t = time.perf_counter()
    r = run_tool(data, "--input", "in.jsonl", "--output", "single.jsonl", "--model_name", tiny, "--mode", "eager",
                 *GEN)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    return read_jsonl(data / "single.jsonl"), r, seconds


# --------------------------------------------------------------------------------------------- pure unit tests
def test_parse_request_errors():
    assert parse_request({"prompt": "hi", "image": "x.png", "seed": 3}, 5).settings == {"seed": 3}
    assert parse_request({"prompt": "hi"}, 5).id == 5
    bad = {"unknown field 'colour'": {"prompt": "x", "colour": 1},
           "field 'temperature' must be a number": {"prompt": "x", "temperature": "hot"},
           "field 'max_new_tokens' must be an integer": {"prompt": "x", "max_new_tokens": 2.5},
           "field 'do_sample' must be true or false": {"prompt": "x", "do_sample": 1},
           "not both": {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
           "needs 'prompt'": {"image": "x.png"},
           "images and a video": {"prompt": "x", "image": "a.png", "video": "v.mp4"},
           "must be >= 0": {"prompt": "x", "top_k": -1},
           "'pdf_dpi' must be > 0": {"prompt": "x", "pdf": "a.pdf", "pdf_dpi": -50}}
    for expect, obj in bad.items():
        with pytest.raises(RequestError, match=expect):
            parse_request(obj, 0)


def test_scan_input_ids_and_line_errors(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": "a", "prompt": "x"}\n\n{"prompt": "y"}\n{"id": 2, "prompt": "z"}\n[1]\n{"id": "a"}\n'
                 '{"id": 1.5}\n{oops\n{"id": "3", "prompt": "3 and \\"3\\" differ"}')
    idx = scan_input(str(p))
    assert idx.indices == [0, 2, 3, 4, 5, 6, 7, 8]
    assert [idx.ids[i] for i in idx.indices] == ["a", 2, 2, 4, "a", 1.5, 7, "3"]
    assert "duplicate id 2" in idx.errors[3] and "duplicate id 'a'" in idx.errors[5]
    assert "JSON object" in idx.errors[4] and "string or an integer" in idx.errors[6]
    assert "invalid JSON" in idx.errors[7] and 8 not in idx.errors and 0 not in idx.errors
    with pytest.raises(JobError, match="not found"):
        scan_input(str(tmp_path / "nope.jsonl"))


def test_layout_hook():
    lay = make_layout(3, 4)
    assert (lay.dp_rank, lay.dp_size, lay.writer, lay.coordinator) == (3, 4, True, False)
    lay = make_layout(3, 4, tp=2)  # the tensor-parallel hook: groups of 2 consecutive ranks share a shard
    assert (lay.dp_rank, lay.dp_size, lay.writer) == (1, 2, False)
    assert make_layout(0, 4, tp=2).coordinator
    with pytest.raises(JobError):
        make_layout(4, 4)
    with pytest.raises(JobError):
        make_layout(0, 3, tp=2)


def test_part_store_repair_and_merge(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": k, "prompt": "x"}) for k in range(4)) + "\n")
    idx = scan_input(str(src))
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    rec = lambda i, **kw: (json.dumps(dict({"id": i, "index": i}, **kw)) + "\n").encode()
    (parts / "rank-0.jsonl").write_bytes(rec(0, answer="a0") + rec(2, error="boom") + rec(3, answer="a3")[:9])
    (parts / "rank-1.jsonl").write_bytes(rec(1, answer="a1") + rec(2, answer="a2"))
    (parts / "rank-7.jsonl").write_bytes(b"")
    store = PartStore(str(parts))
    store.poll()
    assert sorted(store.best) == [0, 1, 2] and not store.best[2].error  # success beats error; cut line ignored
    with pytest.raises(JobError, match="no result yet"):
        merge_parts(idx, str(parts), str(tmp_path / "out.jsonl"))
    assert repair_tail(str(parts / "rank-0.jsonl")) == 9 and repair_tail(str(parts / "rank-0.jsonl")) == 0
    with open(parts / "rank-0.jsonl", "ab") as f:
        f.write(rec(3, answer="a3"))
    assert store.poll() == 1 and 3 in store.best  # incremental: only the new line is read
    merge_parts(idx, str(parts), str(tmp_path / "out.jsonl"))
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [0, 1, 2, 3] and out[2]["answer"] == "a2"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.jsonl.tmp")]


def test_collate_equals_processor_batch(tiny, data):
    """Per-request encodings collated = the processor's own left-padded batch, except the ids under the padding
    (each row's first token instead of the pad token, so the repetition penalty sees the same tokens)."""
    from glm4v_ms.apps.pipeline import Glm4vPipeline
    from glm4v_ms.processing.processor import Glm4vProcessor

    proc = Glm4vProcessor.from_pretrained(tiny)
    convs = [Glm4vPipeline.messages("Describe.", images=[str(data / "a.png")]),
             Glm4vPipeline.messages("A much longer question about both of these pictures, please.",
                                    images=[str(data / "b.png"), str(data / "a.png")]),
             Glm4vPipeline.messages("Text only.")]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    singles = [proc.apply_chat_template(c, **kw) for c in convs]
    ours = collate(singles)
    ref = proc.apply_chat_template(convs, **kw)
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    keep = ref["attention_mask"] == 1
    np.testing.assert_array_equal(ours["input_ids"][keep], ref["input_ids"][keep])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values_videos"] is None
    for row, one in zip(ours["input_ids"], singles):
        assert set(row.tolist()) == set(one["input_ids"].reshape(-1).tolist())


# ------------------------------------------------------------------------------------------ end-to-end runs
def test_single_process_complete_in_order(single, data):
    records, r, seconds = single
    indices, ids = expected_requests(data)
    assert [x["index"] for x in records] == indices and [x["id"] for x in records] == ids
    assert "wrote single.jsonl: 22 result(s), 5 error(s)" in r.stdout
    ok = [x for x in records if "error" not in x]
    assert len(ok) == 17 and all(x["new_tokens"] >= 1 and x["answer"] is not None for x in ok)
    assert max(x["batch_size"] for x in ok) == 4  # batches were formed
    by_id = {x["id"]: x for x in records}
    assert by_id[42]["new_tokens"] <= 3 and by_id[17]["new_tokens"] >= 1  # per-request settings; 17: no id
    # the two videos share a batch; no batch mixes a video with images
    assert by_id["vid0"]["batch_size"] == 2 and by_id["vid0"]["batch_s"] == by_id["vid1"]["batch_s"]
    print(f"\n[batch_infer single process, batch 4: {len(records)} requests in {seconds:.1f} s]")


def test_bad_lines_are_per_line_errors(single):
    records, r, _ = single
    errors = {x["id"]: x["error"] for x in records if "error" in x}
    assert set(errors) == {"nofile", "corrupt", "field", "txt1", 18}, errors  # 18: the invalid line's number
    assert "invalid JSON" in errors[18]
    assert "missing.png" in errors["nofile"] and "broken.png" in errors["corrupt"]
    assert "unknown field 'colour'" in errors["field"]
    assert "duplicate id 'txt1'" in errors["txt1"]
    first_txt1 = [x for x in records if x["id"] == "txt1"]
    assert len(first_txt1) == 2 and "answer" in first_txt1[0] and "error" in first_txt1[1]
    assert r.returncode == 0 and "Traceback" not in r.stderr


def test_batched_equals_each_request_alone(single, tiny, data):
    """Greedy answers of the batched run equal Glm4vPipeline.chat on each request alone (in a batch of 1)."""
    from glm4v_ms.processing.media import load_image
    from glm4v_ms.apps.pipeline import Glm4vPipeline

    records, _, _ = single
    by_id = {x["id"]: x for x in records}
    pipe = Glm4vPipeline.from_pretrained(tiny, mode="eager")
    knobs = dict(max_new_tokens=6, do_sample=False, temperature=1.0, top_k=2, top_p=1e-5, repetition_penalty=1.1)
    a = str(data / "a.png")
    cases = {"img1": (pipe.messages("Describe picture 1. More detail.", images=[a]), a),
             "txt2": (pipe.messages("Tell me a story about the number 2. Please. Please."), None),
             "chat": ([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "image", "image": a},
                                                    {"type": "image", "image": str(data / "b.png")},
                                                    {"type": "text", "text": "Compare."}]}], a)}
    for rid, (messages, first) in cases.items():
        res = pipe.chat(messages, image_size=load_image(first).size if first else None, **knobs).as_dict()
        got = by_id[rid]
        assert got["batch_size"] > 1, f"{rid} ran alone: the comparison would not test batching"
        for k in ("thinking", "answer", "boxes", "boxes_pixels", "prompt_tokens", "new_tokens", "thinking_cut_at"):
            assert got[k] == res[k], (rid, k, got[k], res[k])


def test_graph_mode_batch(single, tiny, data):
    """The default mode (graph, compiled) on a batch of 4 with images and text: the same results as the eager
    reference (itself equal to each request alone)."""
    ids = ["img1", "img3", "txt0", "txt2"]
    ref = {x["id"]: x for x in single[0]}
    lines = [json.dumps(x) for x in _valid_lines(data / "in.jsonl") if x.get("id") in ids]
    (data / "four.jsonl").write_text("\n".join(lines) + "\n")
    r = run_tool(data, "--input", "four.jsonl", "--output", "four_graph.jsonl", "--model_name", tiny, *GEN)
    assert r.returncode == 0, r.stderr
    out = read_jsonl(data / "four_graph.jsonl")
    assert [x["id"] for x in out] == ids and {x["batch_size"] for x in out} == {4}
    for x in out:
        assert {k: v for k, v in same(x).items() if k != "index"} == \
            {k: v for k, v in same(ref[x["id"]]).items() if k != "index"}, x["id"]


def test_msrun_two_workers_equals_single_process(single, tiny, data):
    t = time.perf_counter()
    r = subprocess.run(msrun_cmd(2, "logs_dp", "--input", "in.jsonl", "--output", "dp.jsonl", "--model_name", tiny,
                                 "--mode", "eager", *GEN), cwd=data, env=_env(), capture_output=True, text=True,
                       timeout=400)
    seconds = time.perf_counter() - t
    logs = {n: (data / "logs_dp" / n).read_text() for n in ("worker_0.log", "worker_1.log")}
    assert r.returncode == 0, r.stdout[-3000:] + logs["worker_0.log"][-2000:] + logs["worker_1.log"][-2000:]
    assert "this shard: 12" in logs["worker_0.log"] and "wrote dp.jsonl: 22 result(s)" in logs["worker_0.log"]
    assert "[rank 1: 10 request(s) done" in logs["worker_1.log"]
    # rank 0's progress counts the other rank's results too (read from its part file)
    assert "batch_infer: 22/22 req 100.0%" in logs["worker_0.log"]
    assert sorted(os.listdir(data / "dp.jsonl.parts")) == [".merge.lock", "rank-0.jsonl", "rank-1.jsonl"]
    dp = read_jsonl(data / "dp.jsonl")
    indices, ids = expected_requests(data)
    assert [x["index"] for x in dp] == indices and [x["id"] for x in dp] == ids  # each id once, input order
    ref = single[0]
    assert [same(x) for x in dp] == [same(x) for x in ref]
    print(f"\n[batch_infer msrun 2 workers, batch 4: {len(dp)} requests in {seconds:.1f} s (single process: "
          f"{single[2]:.1f} s)]")


def _children(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _worker(pid, rank):
    import psutil

    for p in _children(pid):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("MS_ROLE") == "MS_WORKER" and env.get("RANK_ID") == str(rank):
            return p
    return None


def _wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_a_worker_and_resume(single, tiny, data):
    """SIGKILL one msrun worker mid-job (msrun then kills the other); rerun with one process: every request once,
    results written before the kill unchanged, and the rerun generates exactly the requests without a complete
    line (at most the batches that were in flight were lost)."""
    args = ["--input", "in.jsonl", "--output", "kill.jsonl", "--model_name", tiny, "--mode", "eager",
            "--batch_size", "2", "--no_progress", *GEN]
    parts = data / "kill.jsonl.parts"
    job = subprocess.Popen(msrun_cmd(2, "logs_kill", *args), cwd=data, env=_env(GLM4V_BATCH_TEST_DELAY=0.7),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def answered(rank):  # error lines are written before any batch runs: count answers
            p = parts / f"rank-{rank}.jsonl"
            return sum(b'"answer"' in l for l in p.read_bytes().splitlines(keepends=True) if l.endswith(b"\n")) \
                if p.exists() else 0

        _wait_for(lambda: answered(0) >= 2 and answered(1) >= 2, 200, "both workers to write 2 answers")
        victim = _worker(job.pid, 1)
        assert victim is not None, "worker of rank 1 not found"
        victim.send_signal(signal.SIGKILL)
        _wait_for(lambda: _worker(job.pid, 0) is None and _worker(job.pid, 1) is None, 30,
                  "msrun to stop the other worker")
    finally:
        if job.poll() is None:  # msrun's scheduler would wait --cluster_time_out: stop msrun and it now
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(60)
    before = part_records(parts)
    total = len(expected_requests(data)[0])
    assert 6 <= len(before) < total, f"the kill came too late or too early: {len(before)} of {total} done"
    print(f"\n[kill test: {len(before)} of {total} results complete in the part files before the restart]")

    # Resume with another world size: one process without msrun takes over both shards.
    r = run_tool(data, *args)
    assert r.returncode == 0, r.stderr
    assert f"{len(before)} done before this run, {total - len(before)} to do over 1 shard(s)" in r.stderr
    after = part_records(parts)
    assert all(after[k] == v for k, v in before.items()), "a result written before the kill changed"
    assert len(after) == total, f"{len(after) - len(before)} generated by the rerun, expected {total - len(before)}"
    out = read_jsonl(data / "kill.jsonl")
    assert [x["index"] for x in out] == expected_requests(data)[0]
    assert [same(x) for x in out] == [same(x) for x in single[0]]


def test_truncated_part_line_is_redone(single, tiny, data):
    """A part file whose last line was cut (killed mid-write): the line is dropped from the file, its request alone
    is redone, and the output equals the reference."""
    src = data / "single.jsonl.parts"
    dst = data / "cut.jsonl.parts"
    shutil.copytree(src, dst)
    part = dst / "rank-0.jsonl"
    raw = part.read_bytes()
    last_start = raw.rstrip(b"\n").rfind(b"\n") + 1
    last = json.loads(raw[last_start:])
    part.write_bytes(raw[:last_start + (len(raw) - last_start) // 2])
    r = run_tool(data, "--input", "in.jsonl", "--output", "cut.jsonl", "--model_name", tiny, "--mode", "eager",
                 *GEN)
    assert r.returncode == 0, r.stderr
    assert "dropped an incomplete last line" in r.stderr and "21 done before this run, 1 to do" in r.stderr
    lines = part.read_bytes().splitlines(keepends=True)
    assert len(lines) == 22 and all(l.endswith(b"\n") for l in lines)
    assert json.loads(lines[-1])["index"] == last["index"]
    assert [same(x) for x in read_jsonl(data / "cut.jsonl")] == [same(x) for x in single[0]]


def test_independent_processes_with_rank_flags(single, tiny, data):
    """Launchers other than msrun: N processes with --rank/--world_size, no communication; the last to finish
    merges. Run here one after the other: the first cannot merge, the second does."""
    args = ["--input", "in.jsonl", "--output", "flags.jsonl", "--model_name", tiny, "--mode", "eager", *GEN,
            "--world_size", "2"]
    r1 = run_tool(data, *args, "--rank", "1")
    assert r1.returncode == 0, r1.stderr
    assert not (data / "flags.jsonl").exists() and "wrote" not in r1.stdout
    r0 = run_tool(data, *args, "--rank", "0")
    assert r0.returncode == 0, r0.stderr
    assert "10 done before this run, 12 to do over 2 shard(s); this shard: 12" in r0.stderr
    assert [same(x) for x in read_jsonl(data / "flags.jsonl")] == [same(x) for x in single[0]]
    again = run_tool(data, *args, "--rank", "1")  # everything done: no model load, merge only
    assert again.returncode == 0 and "22 done before this run, 0 to do" in again.stderr
    assert "wrote flags.jsonl: 22 result(s)" in again.stdout


def tool_main(capsys, *args):
    import importlib.util

    spec = importlib.util.spec_from_file_location("batch_infer_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    old = signal.getsignal(signal.SIGTERM)
    try:
        code = mod.main(list(args))
    finally:
        signal.signal(signal.SIGTERM, old)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing input", "output folder missing", "output is a folder", "unknown model",
                                  "output not ours"])
def test_job_errors_one_line(kind, tiny, data, tmp_path, capsys):
    if kind == "output not ours":  # an existing file that is not a results file of batch_infer
        (tmp_path / "out.jsonl").write_text(json.dumps({"id": "other", "index": 0}) + "\n")
    args = {"missing input": ["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")],
            "output folder missing": ["--input", str(data / "in.jsonl"), "--output", str(tmp_path / "no" / "o.jsonl")],
            "output is a folder": ["--input", str(data / "in.jsonl"), "--output", str(tmp_path)],
            "unknown model": ["--input", str(data / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                              "--model_name", str(tmp_path / "no-model")],
            "output not ours": ["--input", str(data / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                                "--model_name", tiny]}[kind]
    code, err = tool_main(capsys, *args)  # in this process: these fail before any model runs
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("[")]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    expect = {"missing input": "input file not found", "output folder missing": "does not exist",
              "output is a folder": "is a folder", "unknown model": "model folder not found",
              "output not ours": "is not a results file of batch_infer"}[kind]
    assert expect in lines[0], lines[0]


def test_retry_errors(single, tiny, data, tmp_path):
    """A request whose missing image has appeared is redone (its media changed); --retry_errors redoes the
    requests whose result is an error although they did not change. A request that now works replaces its error
    in the merged output, the others keep theirs. (The copied part files are reused in another folder: the
    small media files are identified by their content.)"""
    for name in ("in.jsonl", "a.png", "b.png", "broken.png", "v.mp4"):
        shutil.copy(data / name, tmp_path / name)
    shutil.copytree(data / "single.jsonl.parts", tmp_path / "out.jsonl.parts")
    args = ["--input", "in.jsonl", "--output", "out.jsonl", "--model_name", tiny, "--mode", "eager", *GEN]
    r = run_tool(tmp_path, *args)
    assert r.returncode == 0 and "22 done before this run, 0 to do" in r.stderr, r.stderr
    shutil.copy(data / "a.png", tmp_path / "missing.png")  # the missing image has appeared
    r = run_tool(tmp_path, *args)
    assert r.returncode == 0 and "21 done before this run, 1 to do" in r.stderr, r.stderr
    assert "changed since their earlier result" in r.stderr and "'nofile'" in r.stderr
    r = run_tool(tmp_path, *args, "--retry_errors")
    assert r.returncode == 0 and "18 done before this run, 4 to do" in r.stderr, r.stderr
    out = read_jsonl(tmp_path / "out.jsonl")
    ref = single[0]
    assert [x["index"] for x in out] == [x["index"] for x in ref]
    for x, y in zip(out, ref):
        if x["id"] == "nofile":
            assert "error" in y and "error" not in x and x["new_tokens"] >= 1
        else:
            assert same(x) == same(y)


def test_msrun_tensor_parallel_equals_single_process(tiny, data, tmp_path):
    """--tp 2 under msrun (2 ranks, one TP group, one data shard, only rank 0 writes) gives the single-process
    results. The tiny model gets 2 KV heads so that TP 2 can split them."""
    from safetensors.numpy import save_file
    from glm4v_ms.apps.tiny import random_weights

    model = tmp_path / "tiny_kv2"
    shutil.copytree(tiny, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["text_config"]["num_key_value_heads"] = 2
    (model / "config.json").write_text(json.dumps(cfg))
    save_file(random_weights(cfg, seed=3), str(model / "model.safetensors"), metadata={"format": "pt"})
    lines = (data / "in.jsonl").read_text().splitlines()[:8]
    (data / "tp_in.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--input", "tp_in.jsonl", "--model_name", str(model), "--mode", "eager", *GEN]
    r = run_tool(data, *common, "--output", "tp_single.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(msrun_cmd(2, "logs_tp", *common, "--output", "tp2.jsonl", "--tp", "2"), cwd=data, env=_env(),
                       capture_output=True, text=True, timeout=400)
    logs = {n: (data / "logs_tp" / n).read_text() for n in ("worker_0.log", "worker_1.log")}
    assert r.returncode == 0, r.stdout[-3000:] + logs["worker_0.log"][-3000:] + logs["worker_1.log"][-3000:]
    assert sorted(os.listdir(data / "tp2.jsonl.parts")) == [".merge.lock", "rank-0.jsonl"]  # one shard, one writer
    tp, ref = read_jsonl(data / "tp2.jsonl"), read_jsonl(data / "tp_single.jsonl")
    assert len(ref) == sum(1 for x in lines if x.strip()) and sum("answer" in x for x in ref) >= 5
    assert [same(x) for x in tp] == [same(x) for x in ref]


def test_tensor_parallel_needs_msrun(tiny, data):
    r = run_tool(data, "--input", "in.jsonl", "--output", "x.jsonl", "--model_name", tiny, "--tp", "2")
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    assert "num_key_value_heads" in r.stderr  # the tiny model's single KV head cannot be split, named first


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_test_delay_is_one_line(data, tmp_path, value):
    r = run_tool(data, "--input", "in.jsonl", "--output", str(tmp_path / "o.jsonl"),
                 env=_env(GLM4V_BATCH_TEST_DELAY=value), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: GLM4V_BATCH_TEST_DELAY=") and value in lines[0], r.stderr
    assert not (tmp_path / "o.jsonl").exists()
