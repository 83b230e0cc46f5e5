"""Teachers too big for one GPU in `cachebrew export`: `teachers[i].dtype` (load the weights in bf16 / fp16) and
`teachers[i].device_map` (accelerate spreads one teacher over several GPUs in one process).

A placement changes where the numbers are computed, not what they are, so it leaves the fingerprint alone; a dtype
changes the numbers, so it is fingerprinted. On a CPU the placements are single-device maps; the GPU test needs one.

    pytest tests/recipes/export/test_big_teachers.py
"""
import pytest
import torch

from cachebrew.cache import CacheReader
from cachebrew.errors import CachebrewError, ConfigError
from cachebrew.recipes.export import ExportConfig, run_export
from cachebrew.recipes.export.teachers import dtype_keyword, load_teacher
from fixtures import export_config, make_teacher_dir, make_text_data

COLUMNS = ("bert.logits", "bert.hidden.0", "bert.hidden.2", "bert.attention.1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"teacher": make_teacher_dir(root / "teacher"), "data": make_text_data(root / "data.jsonl", n=24)}


def config(tmp_path, assets, teacher: dict | None = None, **over) -> dict:
    cfg = export_config(tmp_path, assets["teacher"], assets["data"], **over)
    cfg["teachers"] = [{**cfg["teachers"][0], **(teacher or {})}]
    return cfg


def export(tmp_path, assets, teacher: dict | None = None, **over):
    return run_export(ExportConfig.from_dict(config(tmp_path, assets, teacher, **over)))


def rows_by_key(path):
    return {(r["id"], r["copy"]): r for r in CacheReader(path).iter_rows()}


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, {"bert": "cpu", "classifier": "cpu"}])
def test_device_map_exports_the_same_numbers_and_fingerprint(tmp_path, assets, device_map):
    plain = export(tmp_path / "plain", assets)
    placed = export(tmp_path / "placed", assets, {"device_map": device_map})
    assert placed.fingerprint == plain.fingerprint  # where the teacher sits is not what it computes
    a, b = rows_by_key(tmp_path / "plain" / "cache"), rows_by_key(tmp_path / "placed" / "cache")
    assert a.keys() == b.keys() and len(a) == 24
    for key, row in a.items():
        for col in COLUMNS:
            assert torch.equal(row[col], b[key][col]), col
    # the resolved config, device_map included, is saved with the cache
    assert CacheReader(tmp_path / "placed" / "cache").manifest.config["teachers"][0]["device_map"] == device_map


def test_bf16_teacher_is_close_to_fp32_under_another_fingerprint(tmp_path, assets):
    fp32 = export(tmp_path / "fp32", assets)
    bf16 = export(tmp_path / "bf16", assets, {"dtype": "bfloat16"})
    assert bf16.fingerprint != fp32.fingerprint
    a, b = rows_by_key(tmp_path / "fp32" / "cache"), rows_by_key(tmp_path / "bf16" / "cache")
    assert a.keys() == b.keys()
    worst = 0.0
    for key, row in a.items():
        x, y = row["bert.logits"].float(), b[key]["bert.logits"].float()
        worst = max(worst, (x - y).abs().max().item() / (x.abs().max().item() or 1.0))
    assert 0 < worst < 5e-2  # computed in bf16 (8 bits of mantissa), stored in fp32
    # the manifest says which teacher weights made the cache: a bf16 copy is other weights
    teachers = lambda p: CacheReader(p).manifest.teachers["bert"]["weights_sha256"]
    assert teachers(tmp_path / "fp32" / "cache") != teachers(tmp_path / "bf16" / "cache")


def test_dtype_is_fingerprinted_only_when_set(tmp_path, assets):
    """An explicit float32 is the same numbers as the default, but a config that names a dtype is fingerprinted by
    it; a config without one keeps the fingerprint caches exported before the field existed."""
    plain = ExportConfig.from_dict(config(tmp_path, assets)).fingerprint_settings()
    assert "teacher_dtypes" not in plain
    named = ExportConfig.from_dict(config(tmp_path, assets, {"dtype": "float16"})).fingerprint_settings()
    assert named["teacher_dtypes"] == ["float16"]
    placed = ExportConfig.from_dict(config(tmp_path, assets, {"device_map": "auto"})).fingerprint_settings()
    assert placed == plain


def test_bad_dtype_and_device_map_are_config_errors_listing_all(tmp_path, assets):
    cfg = config(tmp_path, assets, {"dtype": "fp64", "device_map": {"bert": "disk", "classifier": "nowhere"}})
    cfg["teachers"].append({"name": "ep", "entry_point": "slow_teacher:build", "device_map": "auto", "dtype": 16})
    cfg["teachers"].append({"name": "two", "path": str(assets["teacher"]), "device_map": True})
    with pytest.raises(ConfigError) as e:
        ExportConfig.from_dict(cfg)
    msg = str(e.value)
    assert "teachers[0].dtype: one of auto, float32, bfloat16, float16, got 'fp64'" in msg
    assert "teachers[0].device_map['bert']: 'disk' offloads weights" in msg
    assert "teachers[0].device_map['classifier']: not a device, got 'nowhere'" in msg
    assert "teachers[1].dtype: must be a string or null, got 16" in msg
    assert "teachers[1].device_map: applies to a Hugging Face directory (path)" in msg
    assert "teachers[2].device_map: must be a string or an integer or a mapping or null, got True" in msg
    for bad in ("everywhere", -1, {}):
        with pytest.raises(ConfigError, match=r"teachers\[0\]\.device_map"):
            ExportConfig.from_dict(config(tmp_path, assets, {"device_map": bad}))


def test_device_map_under_torchrun_is_refused(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    tc = ExportConfig.from_dict(config(tmp_path, assets, {"device_map": "auto"})).teachers[0]
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.device_map: device_map is for one process spanning "
                                          "several GPUs; under torchrun each rank loads the whole teacher"):
        load_teacher(tc, 0, want_attention=False)


def test_a_placed_teacher_stays_where_device_map_put_it(tmp_path, assets):
    """The export moves every teacher to its device; a device_map teacher must not be gathered onto one GPU."""
    tc = ExportConfig.from_dict(config(tmp_path, assets, {"device_map": {"": "cpu"}})).teachers[0]
    model, _ = load_teacher(tc, 0, want_attention=False)
    assert model.to("meta") is model and model.cuda() is model
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(CachebrewError, match=r"keeps its dtype; set teachers\[0\]\.dtype"):
        model.to(torch.float16)


def test_dtype_loads_the_teacher_in_that_dtype(tmp_path, assets):
    for name, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
                           ("auto", torch.float32)):  # auto: config.json's dtype (the fixture saves fp32)
        tc = ExportConfig.from_dict(config(tmp_path, assets, {"dtype": name})).teachers[0]
        model, _ = load_teacher(tc, 0, want_attention=False)
        assert {p.dtype for p in model.parameters()} == {expected}, name


def test_dtype_keyword_follows_the_transformers_release():
    assert dtype_keyword("4.40.2") == "torch_dtype"
    assert dtype_keyword("4.55.4") == "torch_dtype"
    assert dtype_keyword("4.56.0") == "dtype"
    assert dtype_keyword("5.0.0rc1") == "dtype"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_map_on_a_gpu_matches_the_plain_gpu_export(tmp_path, assets):
    """device_map places the teacher on the GPU itself (auto: one GPU here) and the export does not move it."""
    over = {"device": "cuda", "amp": "none"}
    plain = export(tmp_path / "plain", assets, **over)
    for i, device_map in enumerate(("auto", {"": "cuda:0"})):
        placed = export(tmp_path / f"placed{i}", assets, {"device_map": device_map}, **over)
        assert placed.fingerprint == plain.fingerprint
        a, b = rows_by_key(tmp_path / "plain" / "cache"), rows_by_key(tmp_path / f"placed{i}" / "cache")
        for key, row in a.items():
            for col in COLUMNS:
                assert torch.equal(row[col], b[key][col]), (device_map, col)
