"""`cachebrew export` on a tiny BERT: exact read-back, compact storage, resume, verify, skip, errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cachebrew.cache import CacheReader
from cachebrew.errors import CacheMismatchError, CachebrewError, ConfigError
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_ner_data, make_teacher_dir, make_text_data

TESTS = Path(__file__).resolve().parents[2]  # cwd of subprocesses: entry points such as slow_teacher:build


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"teacher": make_teacher_dir(root / "teacher"), "teacher2": make_teacher_dir(root / "teacher2", seed=5),
            "data": make_text_data(root / "data.jsonl", n=40), "root": root}


def export(tmp_path, assets, **over):
    return run_export(ExportConfig.from_dict(export_config(tmp_path, assets["teacher"], assets["data"], **over)))


def rows_by_key(path):
    return {(r["id"], r["copy"]): r for r in CacheReader(path).iter_rows()}


def recompute(teacher_dir, cache_dir, batch_size):
    """Run the teacher on the cache's own batches (shard order, batch_size rows) and compare outputs."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir), attn_implementation="eager").eval()
    reader = CacheReader(cache_dir)
    checked = 0
    for info in reader.manifest.shards:
        rows = reader.read_rows(reader.open_shard(info))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            n = max(len(r["input_ids"]) for r in chunk)
            pad = lambda key: torch.tensor([list(r[key]) + [0] * (n - len(r[key])) for r in chunk])
            with torch.no_grad():
                out = model(input_ids=pad("input_ids"), attention_mask=pad("attention_mask"),
                            token_type_ids=pad("token_type_ids"), output_hidden_states=True, output_attentions=True)
            for i, r in enumerate(chunk):
                L = len(r["input_ids"])
                yield r, {"bert.logits": out.logits[i], "bert.hidden.0": out.hidden_states[0][i, :L],
                          "bert.hidden.2": out.hidden_states[2][i, :L],
                          "bert.attention.1": out.attentions[1][i, :, :L, :L]}
                checked += 1
    assert checked == reader.num_rows


def test_fp32_read_back_is_bit_exact(tmp_path, assets):
    res = export(tmp_path, assets)
    assert not res.skipped and res.rows_total == 40 and res.shards_written == 3
    for row, expected in recompute(assets["teacher"], tmp_path / "cache", batch_size=8):
        for col, t in expected.items():
            assert torch.equal(row[col], t), col
    # unpadded: each row keeps its own length
    lengths = {len(r["input_ids"]) for r in CacheReader(tmp_path / "cache").iter_rows()}
    assert len(lengths) > 3


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_every_codec_stores_the_same_values(tmp_path, assets, codec):
    zstd = export(tmp_path / "zstd", assets, dtypes={"hidden": "fp16"}, compression="zstd")
    other = export(tmp_path / codec, assets, dtypes={"hidden": "fp16"}, compression=codec)
    a, b = rows_by_key(tmp_path / "zstd" / "cache"), rows_by_key(tmp_path / codec / "cache")
    assert a.keys() == b.keys() and len(a) == 40
    for key, row in a.items():
        for col, value in row.items():
            theirs = b[key][col]
            same = torch.equal(value, theirs) if isinstance(value, torch.Tensor) else np.array_equal(value, theirs)
            assert same, col
    # the codec is what Arrow's IPC footer says it is, readable by bare pyarrow
    import pyarrow as pa

    shard = CacheReader(tmp_path / codec / "cache").shard_path(CacheReader(tmp_path / codec / "cache").manifest.shards[0])
    sizes = {name: sum(i.bytes for i in CacheReader(tmp_path / name / "cache").manifest.shards)
             for name in ("zstd", codec)}
    assert sizes[codec] > sizes["zstd"]  # ids and masks compress: a smaller zstd cache shows it was applied
    assert pa.ipc.open_file(str(shard)).read_all().num_rows > 0
    assert zstd.fingerprint != other.fingerprint  # other bytes, another cache
    with pytest.raises(ConfigError, match="compression: one of lz4, zstd, none, got 'gzip'"):
        export(tmp_path / "bad", assets, compression="gzip")


@pytest.mark.parametrize("dtype,tol", [("fp16", 2e-3), ("bf16", 1e-2), ("int8", 1e-2)])
def test_compact_dtypes_within_tolerance(tmp_path, assets, dtype, tol):
    export(tmp_path / "ref", assets)
    export(tmp_path / "small", assets, dtypes={"logits": "fp32" if dtype == "int8" else dtype, "hidden": dtype,
                                               "attention": "fp32" if dtype == "int8" else dtype})
    ref, small = rows_by_key(tmp_path / "ref" / "cache"), rows_by_key(tmp_path / "small" / "cache")
    assert ref.keys() == small.keys()
    worst = 0.0
    for key, r in ref.items():
        for col in ("bert.logits", "bert.hidden.0", "bert.hidden.2", "bert.attention.1"):
            a, b = r[col].float(), small[key][col].float()
            scale = a.abs().max().item() or 1.0
            worst = max(worst, (a - b).abs().max().item() / scale)
    assert 0 < worst < tol  # lossy, but within the format's precision
    size = lambda p: CacheReader(p).manifest.num_bytes
    assert size(tmp_path / "small" / "cache") < 0.75 * size(tmp_path / "ref" / "cache")


def test_topk_logits(tmp_path, assets):
    teacher = make_teacher_dir(assets["root"] / "teacher_wide", num_labels=12)
    cfg = export_config(tmp_path, teacher, assets["data"], outputs={"logits": True, "topk_logits": 3,
                                                                   "hidden_layers": [], "attention_layers": []})
    run_export(ExportConfig.from_dict(cfg))
    full = export_config(tmp_path / "full", teacher, assets["data"], outputs={"logits": True, "hidden_layers": [],
                                                                            "attention_layers": []})
    run_export(ExportConfig.from_dict(full))
    topk, dense = rows_by_key(tmp_path / "cache"), rows_by_key(tmp_path / "full" / "cache")
    for key, r in dense.items():
        got = topk[key]["bert.logits"]
        assert got.shape == (12,)
        values, idx = r["bert.logits"].topk(3)
        assert torch.equal(got[idx], values)
        assert (got == -1e4).sum() == 9


def test_second_export_is_skipped_and_changes_are_detected(tmp_path, assets):
    first = export(tmp_path, assets)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    again = export(tmp_path, assets)
    assert again.skipped and again.fingerprint == first.fingerprint
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    # any input that changes what is written changes the fingerprint, and the directory is refused
    for over in ({"teachers": [{"name": "bert", "path": str(assets["teacher2"])}]}, {"max_length": 16},
                 {"dtypes": {"hidden": "fp16"}}, {"augment": {"copies": 1, "ops": [{"name": "deleting"}]}}):
        with pytest.raises(CacheMismatchError, match="already holds a cache with fingerprint"):
            export(tmp_path, assets, **over)
    replaced = export(tmp_path, assets, max_length=16, overwrite=True)
    assert replaced.fingerprint != first.fingerprint and not replaced.skipped
    other_data = make_text_data(tmp_path / "other.jsonl", n=40, seed=9)
    cfg = export_config(tmp_path, assets["teacher"], other_data, max_length=16)
    with pytest.raises(CacheMismatchError):
        run_export(ExportConfig.from_dict(cfg))


def _write_inputs(rows: list[dict], root: Path) -> dict:
    """The same rows in every format users bring: name -> data config overrides."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    table = pa.Table.from_pylist(rows)
    for name, delimiter in (("data.csv", ","), ("data.tsv", "\t")):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            w.writeheader()
            w.writerows(rows)
    pq.write_table(table, root / "data.parquet")
    with pa.OSFile(str(root / "stream.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)  # what `datasets` itself writes
    with pa.OSFile(str(root / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)  # Arrow's random-access file format (Feather v2)
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    other = datasets.Dataset.from_list([dict(r, sentence="bad bad bad") for r in rows])
    datasets.DatasetDict({"train": other, "validation": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(root / "saved_dict"))
    return {"csv": {"path": str(root / "data.csv")}, "tsv": {"path": str(root / "data.tsv")},
            "parquet": {"path": str(root / "data.parquet")}, "arrow stream": {"path": str(root / "stream.arrow")},
            "arrow file": {"path": str(root / "file.arrow")}, "load_from_disk": {"path": str(root / "saved")},
            "load_from_disk split": {"path": str(root / "saved_dict"), "split": "validation"}}


def test_every_input_format_gives_the_jsonl_cache(tmp_path, assets):
    """csv, tsv, parquet, Arrow files and saved `datasets` directories export the same rows, ids and logits."""
    import json

    rows = [json.loads(line) for line in assets["data"].read_text().splitlines()]
    light = {"outputs": {"hidden_layers": [], "attention_layers": []}}
    export(tmp_path / "jsonl", assets, **light)
    ref = rows_by_key(tmp_path / "jsonl" / "cache")
    assert len(ref) == 40 and sorted(k[0] for k in ref) == [r["uid"] for r in rows]
    for name, data in _write_inputs(rows, tmp_path / "inputs").items():
        out = tmp_path / name.replace(" ", "_")
        export(out, assets, data=data, **light)
        got = rows_by_key(out / "cache")
        assert got.keys() == ref.keys(), name
        for key, r in ref.items():
            g = got[key]
            assert (g["text"], int(g["labels"])) == (r["text"], int(r["labels"])), (name, key)
            assert np.array_equal(g["input_ids"], r["input_ids"]), (name, key)
            assert torch.equal(g["bert.logits"], r["bert.logits"]), (name, key)
        assert CacheReader(out / "cache").manifest.config["data"]["path"] == data["path"]


def test_verify_catches_a_flipped_byte(tmp_path, assets):
    export(tmp_path, assets)
    cache = tmp_path / "cache"
    ok = subprocess.run([sys.executable, "-m", "cachebrew", "verify", str(cache)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (3 shards, 40 rows)" in ok.stdout
    target = cache / "part-00001.arrow"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "cachebrew", "verify", str(cache)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "part-00001.arrow: checksum mismatch" in bad.stderr and "part-00000" not in bad.stderr
    (cache / "part-00002.arrow").unlink()
    assert "part-00002.arrow: missing" in "\n".join(CacheReader(cache).verify())


def test_augmentation_is_deterministic_per_id_and_seed(tmp_path, assets):
    aug = {"copies": 2, "seed": 3, "ops": [{"name": "masking", "p": 0.3}, {"name": "short_disorder",
                                                                           "p": [0.5, 0.5, 0, 0, 0]}]}
    export(tmp_path / "a", assets, augment=aug)
    export(tmp_path / "b", assets, augment=aug)
    export(tmp_path / "c", assets, augment={**aug, "seed": 4})
    a, b, c = (rows_by_key(tmp_path / x / "cache") for x in "abc")
    assert len(a) == 120 and {k[1] for k in a} == {0, 1, 2}
    assert {k: r["text"] for k, r in a.items()} == {k: r["text"] for k, r in b.items()}
    changed = sum(a[(i, 1)]["text"] != a[(i, 0)]["text"] for i, _ in a if _ == 0)
    assert changed > 30  # augmented copies differ from their originals
    assert any(a[k]["text"] != c[k]["text"] for k in a if k[1] > 0)  # the seed matters
    assert all(a[k]["text"] == c[k]["text"] for k in a if k[1] == 0)  # originals never change
    assert any("[MASK]" in r["text"] for r in a.values())


def test_several_teachers_in_one_export_and_joinable_caches(tmp_path, assets):
    two = [{"name": "bert", "path": str(assets["teacher"])}, {"name": "other", "path": str(assets["teacher2"])}]
    export(tmp_path / "both", assets, teachers=two)
    export(tmp_path / "one", assets, teachers=[{"name": "other", "path": str(assets["teacher2"])}])
    both, one = rows_by_key(tmp_path / "both" / "cache"), rows_by_key(tmp_path / "one" / "cache")
    m = CacheReader(tmp_path / "both" / "cache").manifest
    assert set(m.teachers) == {"bert", "other"}
    assert both.keys() == one.keys()  # separate caches of the same data join on (id, copy)
    for key, r in both.items():
        assert not torch.equal(r["bert.logits"], r["other.logits"])
        torch.testing.assert_close(r["other.logits"], one[key]["other.logits"], rtol=0, atol=1e-6)


def test_sentence_data_keeps_the_sequence_classification_default(tmp_path):
    cfg = ExportConfig.from_dict({"output": str(tmp_path / "c"), "teachers": [{"name": "t", "path": "p"}],
                                  "data": {"path": "d.jsonl", "text": "text"}})
    assert cfg.teachers[0].model_class == "AutoModelForSequenceClassification"


def test_token_level_export(tmp_path, assets):
    teacher = make_teacher_dir(assets["root"] / "ner_teacher", num_labels=3, token_level=True)
    data = make_ner_data(tmp_path / "ner.jsonl")
    cfg = export_config(tmp_path, teacher, data, data={"path": str(data), "text": None, "tokens": "tokens",
                                                       "label": "tags", "id": None},
                        teachers=[{"name": "bert", "path": str(teacher)}],  # the class follows the data
                        outputs={"hidden_layers": [], "attention_layers": []})
    config = ExportConfig.from_dict(cfg)
    assert config.teachers[0].model_class == "AutoModelForTokenClassification"
    run_export(config)
    reader = CacheReader(tmp_path / "cache")
    assert reader.manifest.token_level and reader.manifest.label_names == ["B-POS", "O"]
    for r in reader.iter_rows():
        L = len(r["input_ids"])
        assert r["bert.logits"].shape == (L, 3) and len(r["labels"]) == L
        words = r["words"]
        tagged = [int(x) for x in r["labels"] if x != -100]
        assert tagged == [0 if w in ("good", "great", "best") else 1 for w in words]


def test_clear_errors(tmp_path, assets):
    with pytest.raises(CachebrewError, match="data.path: no such file"):
        export(tmp_path, assets, data={"path": str(tmp_path / "nope.csv")})
    with pytest.raises(ConfigError, match=r"data.text: column 'sentense' not in .*columns: uid, sentence, label"):
        export(tmp_path, assets, data={"text": "sentense"})
    with pytest.raises(ConfigError, match=r"outputs.hidden_layers: layer 7 is out of range for teacher 'bert', "
                                          r"which returns 3 hidden_states \(indices 0..2\)"):
        export(tmp_path, assets, outputs={"hidden_layers": [7]})
    with pytest.raises(CachebrewError, match="teacher 'bert' returned no 'hidden_states'"):
        run_export(ExportConfig.from_dict(export_config(
            tmp_path, assets["teacher"], assets["data"], tokenizer=str(assets["teacher"]),
            teachers=[{"name": "bert", "entry_point": "slow_teacher:no_hidden"}], outputs={"attention_layers": []})))
    with pytest.raises(ConfigError) as e:
        ExportConfig.from_dict({"teachers": [{"name": "a b", "path": "x", "entry_point": "m:f"}],
                                "dtypes": {"logits": "int8"}, "outputs": {"hidden_layers": [1, 1]}, "bogus": 1})
    text = str(e.value)
    for part in ("output: required", "teachers[0].name", "teachers[0]: give exactly one of path",
                 "dtypes.logits", "outputs.hidden_layers: duplicate", "bogus: unknown field", "data.path: required"):
        assert part in text


def test_cli_export_errors_have_no_traceback(tmp_path, assets):
    cfg = export_config(tmp_path, assets["teacher"], assets["data"], data={"text": "sentense"})
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "cachebrew", "export", str(path)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "column 'sentense' not in" in res.stderr
    ok = subprocess.run([sys.executable, "-m", "cachebrew", "export", str(path), "--set", "data.text=sentence"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "40 rows in 3 shards" in ok.stdout
    again = subprocess.run([sys.executable, "-m", "cachebrew", "export", str(path), "--set", "data.text=sentence"],
                           capture_output=True, text=True)
    assert "up to date" in again.stdout


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, assets):
    data = make_text_data(tmp_path / "d.jsonl", n=96, seed=2)
    cfg = export_config(tmp_path, assets["teacher"], data, tokenizer=str(assets["teacher"]), batch_size=4,
                        shard_rows=8, teachers=[{"name": "bert", "entry_point": "slow_teacher:build"}],
                        outputs={"hidden_layers": [1], "attention_layers": []})
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "CB_TEACHER_DIR": str(assets["teacher"]), "CB_TEACHER_DELAY": "0.08"}
    cmd = [sys.executable, "-m", "cachebrew", "export", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "cache"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("part-*.arrow"))) < 4:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(p.name for p in cache.glob("part-*.arrow"))
    assert 4 <= len(complete) < 12 and not (cache / "manifest.json").exists(), complete
    res = subprocess.run(cmd, cwd=TESTS, env={**env, "CB_TEACHER_DELAY": "0"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"({len(complete)} resumed)" in res.stdout
    assert not list(cache.glob(".*.tmp"))
    ids = [(r["id"], r["copy"]) for r in CacheReader(cache).iter_rows()]
    assert sorted(ids) == sorted((f"ex{i:04d}", 0) for i in range(96))  # nothing lost, nothing twice
    # identical to an export that was never interrupted
    clean = dict(cfg, output=str(tmp_path / "clean"))
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean))
    subprocess.run([sys.executable, "-m", "cachebrew", "export", str(tmp_path / "clean.yaml"), "--no-progress"],
                   cwd=TESTS, env={**env, "CB_TEACHER_DELAY": "0"}, check=True, capture_output=True)
    a, b = rows_by_key(cache), rows_by_key(tmp_path / "clean")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k]["bert.hidden.1"], b[k]["bert.hidden.1"])
    assert CacheReader(cache).verify() == []


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(tmp_path, assets):
    cfg = export_config(tmp_path, assets["teacher"], assets["data"], output=str(tmp_path / "one"))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(dict(cfg, output=str(tmp_path / "two"))))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-m", "cachebrew", "export", str(tmp_path / "one.yaml"), "--no-progress"],
                   env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cachebrew", "export", str(tmp_path / "two.yaml"), "--no-progress"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "two")
    assert one.manifest.fingerprint == two.manifest.fingerprint
    assert [s.sha256 for s in one.manifest.shards] == [s.sha256 for s in two.manifest.shards]
    assert two.verify() == []
