"""Faults and sharing: SIGKILL sweeps, a full disk, concurrent exports, corrupt caches, and caches on S3
(a real S3-compatible server, moto's, started on loopback). docs/reliability.md tabulates what these find."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cachebrew.cache import CacheReader
from cachebrew.components.loader import CacheBatches
from cachebrew.cache.lock import DirectoryLock
from cachebrew.cache.sharing import copy_cache, find_caches
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.errors import CacheFormatError, CachebrewError
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_teacher_dir, make_text_data

HERE = Path(__file__).parent
STUDENT = {"model_type": "bert", "vocab_size": 88, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0}
SUMMARY = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    teacher = make_teacher_dir(root / "teacher")
    train, dev = make_text_data(root / "train.jsonl", n=96, seed=2), make_text_data(root / "dev.jsonl", n=16, seed=3)
    caches = {}
    for name, data in (("train", train), ("dev", dev)):
        run_export(ExportConfig.from_dict(export_config(root / name, teacher, data,
                                                        outputs={"hidden_layers": [2], "attention_layers": []})))
        caches[name] = root / name / "cache"
    return {"root": root, "teacher": teacher, "train": train, "caches": caches}


def _cli(*args):
    return [sys.executable, "-m", "cachebrew", *map(str, args)]


def _kill_sweep(cmd, env, progress, kills, rng, slow_env, jitter, max_wait=120):
    """Run `cmd` repeatedly, SIGKILLing each run at a random moment after it made progress; return kill log."""
    log = []
    for _ in range(kills):
        before = progress()
        proc = subprocess.Popen(cmd, cwd=HERE, env={**env, **slow_env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + max_wait
        while time.time() < deadline and progress() <= before and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, jitter))  # somewhere inside the next unit of work: mid-batch, mid-write, ...
        finished = proc.poll()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.append({"progress_before": before, "progress_at_kill": progress(), "had_finished": finished})  # None: killed
    return log


@pytest.mark.slow
def test_export_survives_five_sigkills(world, tmp_path):
    cfg = export_config(tmp_path, world["teacher"], world["train"], tokenizer=str(world["teacher"]), batch_size=4,
                        shard_rows=4, teachers=[{"name": "bert", "entry_point": "slow_teacher:build"}],
                        outputs={"hidden_layers": [1], "attention_layers": []})
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    env = {**os.environ, "CB_TEACHER_DIR": str(world["teacher"]), "CB_TEACHER_DELAY": "0"}
    progress = lambda: len(list(cache.glob("part-*.arrow")))  # 24 shards of one 0.1 s batch each
    log = _kill_sweep(_cli("export", tmp_path / "export.yaml", "--no-progress"), env, progress, 5,
                      random.Random(7), {"CB_TEACHER_DELAY": "0.1"}, jitter=0.1)
    assert [e["had_finished"] for e in log] == [None] * 5 and not (cache / "manifest.json").exists()
    res = subprocess.run(_cli("export", tmp_path / "export.yaml", "--no-progress"), cwd=HERE, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(cache.glob(".*.tmp"))
    reader = CacheReader(cache)
    assert reader.verify() == []
    ids = sorted((r["id"], r["copy"]) for r in reader.iter_rows())
    assert ids == sorted((f"ex{i:04d}", 0) for i in range(96))  # none lost, none twice
    # byte-identical to an export that was never interrupted
    clean = dict(cfg, output=str(tmp_path / "clean"))
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean))
    subprocess.run(_cli("export", tmp_path / "clean.yaml", "--no-progress"), cwd=HERE, env=env, check=True,
                   capture_output=True)
    assert [s.sha256 for s in reader.manifest.shards] == [s.sha256 for s in CacheReader(tmp_path / "clean").manifest.shards]
    SUMMARY["export"] = log
    print("export kill sweep:", json.dumps(log))


@pytest.mark.slow
def test_distill_survives_five_sigkills(world, tmp_path):
    def write(name):
        cfg = {"output_dir": str(tmp_path / name), "caches": [str(world["caches"]["train"])],
               "eval_cache": str(world["caches"]["dev"]), "seed": 5,
               "student": {"entry_point": "slow_teacher:slow_student"},
               "distill": {"temperature": 4, "hard_label_weight": 0.5},
               "train": {"steps": 60, "batch_size": 8, "lr": 1e-3, "progress_bar": False, "shuffle_buffer": 16,
                         "save_every": 5, "eval_every": 20, "gradient_accumulation_steps": 2}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return tmp_path / f"{name}.yaml"

    env = {**os.environ, "CB_STUDENT_DELAY": "0"}
    full = subprocess.run(_cli("distill", write("full"), "--no-progress"), cwd=HERE, env=env, capture_output=True,
                          text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    ckpts = tmp_path / "cut" / "checkpoints"

    def progress():
        steps = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "state.json").exists()] \
            if ckpts.exists() else []
        return max(steps, default=0)

    log = _kill_sweep(_cli("distill", write("cut"), "--no-progress", "--resume"), env, progress, 5,
                      random.Random(11), {"CB_STUDENT_DELAY": "0.02"}, jitter=0.15)
    assert [e["had_finished"] for e in log] == [None] * 5
    assert not (tmp_path / "cut" / "results.json").exists()
    res = subprocess.run(_cli("distill", write("cut"), "--no-progress", "--resume"), cwd=HERE, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = load_file(tmp_path / "full" / "last" / "model.safetensors"), load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run ended with different weights"
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("full", "cut"))
    assert ra["history"] == rb["history"] and ra["global_step"] == rb["global_step"] == 60
    SUMMARY["distill"] = log
    print("distill kill sweep:", json.dumps(log))


def _small_filesystem(path: Path, size_kb: int):
    """A tmpfs of size_kb when this process may mount one; else None (the test falls back to RLIMIT_FSIZE)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return path if res.returncode == 0 else None


def test_full_disk_fails_clearly_and_leaves_no_complete_looking_shard(world, tmp_path):
    data = make_text_data(tmp_path / "d.jsonl", n=96, seed=4)
    mnt = tmp_path / "small"
    mounted = _small_filesystem(mnt, 160)
    cfg = export_config(mnt, world["teacher"], data, shard_rows=16,
                        outputs={"hidden_layers": [0, 1, 2], "attention_layers": [0, 1]})
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(cfg))
    cmd = _cli("export", tmp_path / "export.yaml", "--no-progress")
    try:
        if mounted:
            res = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        else:  # a per-file size quota (below one shard's size): writes past it fail with EFBIG, not ENOSPC
            import resource

            def limit():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))

            res = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, preexec_fn=limit)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "error:" in res.stderr and ("No space left on device" in res.stderr or "File too large" in res.stderr)
        assert "Traceback" not in res.stderr
        cache = mnt / "cache"
        assert not (cache / "manifest.json").exists()
        assert not list(cache.glob(".*.tmp")) and not (cache / ".lock").exists()
        shards = list(cache.glob("part-*.arrow"))
        for p in shards:  # whatever is there is complete: it reads back and carries the export's fingerprint
            from cachebrew.cache.shards import read_shard_meta

            assert read_shard_meta(p)["fingerprint"]
        SUMMARY["full_disk"] = {"mounted_tmpfs": bool(mounted), "complete_shards_left": len(shards),
                                "error": res.stderr.strip().splitlines()[-1]}
        print("full disk:", SUMMARY["full_disk"])
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


def test_concurrent_exports_one_wins(world, tmp_path):
    cfg = export_config(tmp_path, world["teacher"], world["train"], tokenizer=str(world["teacher"]), batch_size=4,
                        shard_rows=8, teachers=[{"name": "bert", "entry_point": "slow_teacher:build"}],
                        outputs={"hidden_layers": [1], "attention_layers": []})
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "CB_TEACHER_DIR": str(world["teacher"]), "CB_TEACHER_DELAY": "0.03"}
    cmd = _cli("export", tmp_path / "export.yaml", "--no-progress")
    first = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "cache"
    deadline = time.time() + 60
    while time.time() < deadline and not (cache / ".lock").exists():
        time.sleep(0.01)
    second = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2
    assert f"being written by another export (pid {first.pid}" in second.stderr
    assert CacheReader(cache).verify() == [] and CacheReader(cache).num_rows == 96
    assert not (cache / ".lock").exists()


def test_a_dead_exports_lock_is_taken_over(world, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    with DirectoryLock(tmp_path / "c"):
        assert json.loads((tmp_path / "c" / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(CachebrewError, match=f"pid {os.getpid()}"):
            DirectoryLock(tmp_path / "c").acquire()
    assert not (tmp_path / "c" / ".lock").exists()


def _corrupt_copies(src: Path, root: Path) -> dict:
    def copy(name):
        shutil.copytree(src, root / name)
        return root / name

    out = {}
    p = copy("flipped") / "part-00001.arrow"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    out["flipped byte"] = p.parent
    p = copy("truncated") / "part-00002.arrow"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    out["truncated shard"] = p.parent
    d = copy("missing")
    (d / "part-00000.arrow").unlink()
    out["missing shard"] = d
    for name, change in (("rows edited", lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] - 1)),
                         ("sha256 edited", lambda m: m["shards"][1].update(sha256="0" * 64)),
                         ("fingerprint edited", lambda m: m.update(fingerprint="f" * 64))):
        d = copy(name.replace(" ", "_"))
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))
        out[f"manifest {name}"] = d
    return out


def test_every_corruption_is_caught_before_training(world, tmp_path):
    detected = {}
    for what, cache in _corrupt_copies(world["caches"]["train"], tmp_path).items():
        cfg = DistillRunConfig.from_dict({
            "output_dir": str(tmp_path / "runs" / cache.name), "caches": [str(cache)], "seed": 1,
            "student": {"config": dict(STUDENT)}, "distill": {"temperature": 4},
            "train": {"epochs": 1, "batch_size": 8, "progress_bar": False}})
        with pytest.raises(CacheFormatError) as e:
            run_distill(cfg)
        assert str(cache) in str(e.value) and "not training on it" in str(e.value)
        assert not (tmp_path / "runs" / cache.name / "checkpoints").exists()
        assert not (tmp_path / "runs" / cache.name / "last").exists()
        detected[what] = str(e.value).split(": ", 2)[-1][:90]
    assert len(detected) == 6
    SUMMARY["corruptions"] = detected
    print("corruptions:", json.dumps(detected, indent=1))


# -- S3 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (real HTTP, real pyarrow S3 client) and a bucket `team`."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir("team")
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    yield {"uri": lambda path: f"s3://team/{path}{query}", "fs": fs}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_push_ls_stream_and_pull_through_s3(world, s3, tmp_path):
    local = world["caches"]["train"]
    uri = s3["uri"]("pushed/rt-train")  # a prefix of its own: the other S3 test's caches are not in its listing
    report = copy_cache(local, uri)
    m = CacheReader(local).manifest
    assert (report.copied, report.skipped) == (len(m.shards), 0)
    assert copy_cache(local, uri).copied == 0  # a second push has nothing to do
    remote = CacheReader(uri)
    assert remote.manifest.fingerprint == m.fingerprint and remote.verify() == []
    assert find_caches(s3["uri"]("pushed")) == [uri]
    # distill streams from the bucket: the same batches as from the local directory
    streamed = 0
    for a, b in zip(CacheBatches(uri, 8, seed=3), CacheBatches(local, 8, seed=3), strict=True):
        assert a["ids"] == b["ids"]
        streamed += len(a["ids"])
        assert torch.equal(a["teacher_cache"]["logits"], b["teacher_cache"]["logits"])
    assert streamed == m.num_rows
    # pull, interrupted: one shard missing and one half-written temp file -> resumed, verified
    pulled = tmp_path / "pulled"
    copy_cache(uri, pulled)
    (pulled / "part-00003.arrow").unlink()
    (pulled / "manifest.json").unlink()
    (pulled / ".part-00003.arrow.999.tmp").write_bytes(b"half")
    report = copy_cache(uri, pulled)
    assert (report.copied, report.skipped) == (1, len(m.shards) - 1)
    assert CacheReader(pulled).verify() == []
    # a corrupted object in the bucket is refused on pull, and nothing complete-looking is left behind
    s3["fs"].delete_file("team/pushed/rt-train/part-00002.arrow")
    good = (local / "part-00002.arrow").read_bytes()
    with s3["fs"].open_output_stream("team/pushed/rt-train/part-00002.arrow") as f:
        f.write(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    fresh = tmp_path / "fresh"
    with pytest.raises(CacheFormatError, match="part-00002.arrow: sha256"):
        copy_cache(uri, fresh)
    assert not (fresh / "part-00002.arrow").exists() and not (fresh / "manifest.json").exists()
    assert not list(fresh.glob(".*.tmp"))
    assert any("part-00002.arrow: checksum mismatch" in p for p in CacheReader(uri).verify())


def test_export_to_s3_and_distill_from_it(world, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBREW_STAGING", str(tmp_path / "staging"))
    uri = s3["uri"]("caches/dev-from-export")
    cfg = export_config(tmp_path, world["teacher"], world["train"], output=uri,
                        outputs={"hidden_layers": [2], "attention_layers": []})
    result = run_export(ExportConfig.from_dict(cfg))
    assert result.output == uri and CacheReader(uri).verify() == []
    assert CacheReader(uri).manifest.fingerprint == CacheReader(world["caches"]["train"]).manifest.fingerprint
    again = run_export(ExportConfig.from_dict(cfg))  # same inputs: nothing recomputed, nothing re-uploaded
    assert again.skipped
    out = tmp_path / "run"
    run = run_distill(DistillRunConfig.from_dict({
        "output_dir": str(out), "caches": [uri], "eval_cache": str(world["caches"]["dev"]), "seed": 1,
        "student": {"config": dict(STUDENT)}, "distill": {"temperature": 4},
        "train": {"epochs": 1, "batch_size": 16, "progress_bar": False}}))
    assert run.global_step == 6 and (out / "last" / "model.safetensors").is_file()
    copy_cache(world["caches"]["dev"], s3["uri"]("caches/dev-pushed"))  # a second cache of its own, for ls
    ls = subprocess.run(_cli("ls", s3["uri"]("caches")), cwd=HERE, capture_output=True, text=True,
                        env={**os.environ})
    assert ls.returncode == 0, ls.stderr
    rows = {line.split()[0].rsplit("/", 1)[-1]: line.split() for line in ls.stdout.splitlines()[1:]}
    assert rows["dev-from-export"][1:4] == ["bert(teacher)", "train.jsonl", "96"]
    assert rows["dev-pushed"][1:4] == ["bert(teacher)", "dev.jsonl", "16"]
