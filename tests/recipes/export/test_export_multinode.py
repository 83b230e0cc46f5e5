"""`cachebrew export` across nodes that share no disk: each rank pushes its own shards to a URI, rank 0 publishes
the manifest last, and a local output that is not one shared directory is refused instead of published broken.

Two nodes on one machine: two torchrun launches (`--nnodes 2`, one process each), each in a working directory of
its own, so a relative `output` is a different directory per node, as a node-local disk is. One torchrun with two
processes simulates them too for a URI output, since every rank stages into a directory of its own.

    pytest tests/recipes/export/test_export_multinode.py            # the fast checks
    pytest tests/recipes/export/test_export_multinode.py -m slow    # the torchrun ones
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cachebrew.cache import CacheReader
from cachebrew.cache.storage import locate
from cachebrew.errors import CacheFormatError, CachebrewError
from cachebrew.recipes.export.recipe import check_shards_present, check_shared_output, staging_dir
from fixtures import export_config, make_teacher_dir, make_text_data

ROWS = 40  # 3 shards of 16 rows: rank 0 writes shards 0 and 2, rank 1 shard 1


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"teacher": make_teacher_dir(root / "teacher"), "data": make_text_data(root / "data.jsonl", n=ROWS)}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: Path, assets, output: str) -> Path:
    cfg = export_config(path.parent, assets["teacher"], assets["data"], output=output,
                        outputs={"hidden_layers": [1], "attention_layers": []})
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_nodes(config: Path, nodes: list[Path], env: dict) -> list[tuple[int, str, str]]:
    """Run `cachebrew export config` as two torchrun nodes, node r in directory nodes[r]; (rc, stdout, stderr) each."""
    port = _free_port()
    procs, logs = [], []
    for rank, cwd in enumerate(nodes):
        cwd.mkdir(parents=True, exist_ok=True)
        out, err = open(cwd / "stdout.log", "w+"), open(cwd / "stderr.log", "w+")
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "cachebrew", "export", str(config), "--no-progress"], cwd=cwd, env=env, stdout=out, stderr=err))
    results = []
    for proc, (out, err) in zip(procs, logs):
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        out.seek(0), err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cachebrew", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=600)


def _shard(directory: Path, index: int, rows: int = 2) -> dict:
    """A small file named like shard `index`, and the ShardInfo dict a rank would report for it."""
    path = directory / f"part-{index:05d}.arrow"
    path.write_bytes(b"x" * (100 + index))
    return {"path": path.name, "index": index, "rows": rows, "bytes": 100 + index, "sha256": "0" * 64,
            "first_row": 0, "batches": [rows]}


# -- the checks, with the shard lists ranks would gather ---------------------------------------------------------
def test_a_local_output_missing_another_nodes_shards_is_refused_naming_them(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    mine = [_shard(out, 0), _shard(out, 2)]
    elsewhere = tmp_path / "node-b"
    elsewhere.mkdir()
    theirs = [_shard(elsewhere, 1), _shard(elsewhere, 3)]  # written on the other node's disk, not in `out`
    parts = [{"rank": 0, "host": "node-a", "shards": mine}, {"rank": 1, "host": "node-b", "shards": theirs}]
    with pytest.raises(CachebrewError) as e:
        check_shards_present(locate(out), parts, pushed=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(out.resolve()))
    assert "part-00001.arrow, part-00003.arrow (rank 1 on node-b)" in msg
    assert "rank 0 on node-a" in msg and "not shared between the nodes" in msg
    assert "file:///shared/cache" in msg and "s3://" in msg and "part-00000" not in msg
    # present, but with another size than its rank recorded: a stale or foreign file, refused alike
    _shard(out, 1), _shard(out, 3)
    (out / "part-00003.arrow").write_bytes(b"short")
    with pytest.raises(CachebrewError, match=r"part-00003.arrow \(5 bytes, not 103\) \(rank 1 on node-b\)"):
        check_shards_present(locate(out), parts, pushed=False)
    (out / "part-00003.arrow").write_bytes(b"x" * 103)
    check_shards_present(locate(out), parts, pushed=False)  # all there: nothing to say


def test_a_shard_missing_at_the_destination_is_named_with_the_rank_that_pushed_it(tmp_path):
    dest = tmp_path / "bucket"
    dest.mkdir()
    parts = [{"rank": 0, "host": "node-a", "shards": [_shard(dest, 0)]},
             {"rank": 1, "host": "node-b", "shards": [_shard(tmp_path, 1)]}]
    with pytest.raises(CacheFormatError) as e:
        check_shards_present(locate(dest), parts, pushed=True)
    msg = str(e.value)
    assert "\n" not in msg and "part-00001.arrow (rank 1 on node-b)" in msg and "manifest was not written" in msg


def test_a_rank_whose_lock_is_not_in_rank_0s_directory_means_it_is_not_shared(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    peers = [{"rank": 0, "host": "node-a", "pid": 11}, {"rank": 1, "host": "node-b", "pid": 22}]
    with pytest.raises(CachebrewError) as e:
        check_shared_output(out, peers)
    msg = str(e.value)
    assert "\n" not in msg and "not shared between the nodes" in msg
    assert "rank 0 on node-a" in msg and "rank 1 on node-b" in msg and "s3://" in msg
    (out / ".lock-rank1").write_text(json.dumps({"pid": 99, "host": "node-a"}))  # a stale lock of another run
    with pytest.raises(CachebrewError, match="rank 1 on node-b"):
        check_shared_output(out, peers)
    (out / ".lock-rank1").write_text(json.dumps({"pid": 22, "host": "node-b", "started": 0}))
    check_shared_output(out, peers)


def test_each_rank_stages_an_export_to_a_uri_in_a_directory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBREW_STAGING", str(tmp_path))
    uri = "s3://team/caches/sst2"
    dirs = [staging_dir(uri, rank) for rank in range(3)]
    assert len(set(dirs)) == 3 and all(d.parent == tmp_path for d in dirs)
    assert dirs[0] == staging_dir(uri)  # rank 0 keeps the single-process directory: a rerun without torchrun resumes
    assert staging_dir("s3://team/caches/other", 1) not in dirs


# -- two nodes, for real -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_nodes_with_their_own_output_directories_are_refused_before_the_teachers_run(tmp_path, assets):
    config = _write_config(tmp_path / "export.yaml", assets, output="cache")  # relative: a directory per node
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    results = _two_nodes(config, nodes, _env())
    for rank, (rc, _, err) in enumerate(results):
        assert rc != 0, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "cachebrew/recipes" not in err, err[-3000:]  # torchrun's own traceback only
        assert "not shared between the nodes" in lines[0] and "rank 1 on" in lines[0], lines[0]
    assert "exitcode  : 2" in results[0][2] or "exitcode: 2" in results[0][2].replace(" ", "")
    for node in nodes:
        assert not (node / "cache" / "manifest.json").exists()
        assert not list((node / "cache").glob("part-*.arrow"))  # stopped before any teacher ran


@pytest.mark.slow
def test_two_nodes_sharing_a_file_uri_output_publish_a_whole_cache(tmp_path, assets):
    shared = tmp_path / "shared" / "cache"
    config = _write_config(tmp_path / "export.yaml", assets, output=f"file://{shared}")
    results = _two_nodes(config, [tmp_path / "node0", tmp_path / "node1"], _env())
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert "40 rows in 2 shards (0 resumed)" in results[0][1]  # rank 0's share: shards 0 and 2
    res = _cli("verify", f"file://{shared}")
    assert res.returncode == 0, res.stdout + res.stderr
    ids = sorted(r["id"] for r in CacheReader(shared).iter_rows())
    assert ids == sorted(f"ex{i:04d}" for i in range(ROWS))


# -- each rank pushes its own shards to an S3 bucket ----------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (real HTTP, the pyarrow S3 client) with a bucket `team`."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_REGION": "us-east-1"}
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir("team")
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    yield {"uri": lambda path: f"s3://team/{path}{query}", "fs": fs, "env": creds}
    server.stop()


@pytest.mark.slow
def test_two_ranks_push_their_own_shards_and_rank_0_publishes_last(tmp_path, assets, s3, monkeypatch):
    for key, value in {"CACHEBREW_STAGING": str(tmp_path / "staging"), **s3["env"]}.items():
        monkeypatch.setenv(key, value)  # here too: staging_dir and CacheReader below read them
    uri = s3["uri"]("caches/multinode")
    config = _write_config(tmp_path / "export.yaml", assets, output=uri)
    env = _env()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "cachebrew", "export", str(config), "--no-progress"]
    res = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "40 rows in 2 shards (0 resumed)" in res.stdout  # rank 0's share: shards 0 and 2
    # each rank built its shards on its own "disk": neither staging directory holds the whole cache
    staged = {rank: sorted(p.name for p in staging_dir(uri, rank).glob("part-*.arrow"))
              for rank in (0, 1)}
    assert staged == {0: ["part-00000.arrow", "part-00002.arrow"], 1: ["part-00001.arrow"]}
    assert not (staging_dir(uri, 0) / "manifest.json").exists()
    verify = _cli("verify", uri, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert sorted(r["id"] for r in CacheReader(uri).iter_rows()) == sorted(f"ex{i:04d}" for i in range(ROWS))
    again = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr[-3000:]
    # a push cut short: the manifest and rank 1's shard never reached the bucket -> resumed from the staging
    # directories, nothing recomputed, pushed again, published
    s3["fs"].delete_file("team/caches/multinode/manifest.json")
    s3["fs"].delete_file("team/caches/multinode/part-00001.arrow")
    resumed = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "40 rows in 2 shards (2 resumed)" in resumed.stdout  # rank 0 printed; rank 1 resumed its one
    verify = _cli("verify", uri, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
