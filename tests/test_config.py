"""Configs: TextBrewer's fields and defaults, validation that names every bad field, file round trips, CLI."""
import inspect
import json
import subprocess
import sys

import pytest

from cachebrew import ConfigError, DistillationConfig, TrainingConfig
from cachebrew.cli import main as cli_main

GOOD_MATCH = {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
              "proj": ["linear", 32, 48]}


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def test_distillation_config_defaults_match_textbrewer(textbrewer):
    ours, theirs = _defaults(DistillationConfig), _defaults(textbrewer.DistillationConfig)
    assert {k: ours[k] for k in theirs} == theirs
    # cachebrew's addition, for teachers of another tokenizer; a TextBrewer script never sets it
    assert set(ours) - set(theirs) == {"cross_tokenizer_uld"}


def test_training_config_keeps_every_textbrewer_field(textbrewer):
    ours, theirs = _defaults(TrainingConfig), _defaults(textbrewer.TrainingConfig)
    assert set(theirs) <= set(ours)
    # documented differences: device auto-detects, local_rank reads torchrun's environment
    diff = {k for k in theirs if theirs[k] != ours[k]}
    assert diff == {"device", "local_rank"}


def test_training_config_has_no_side_effects(tmp_path):
    TrainingConfig(output_dir=str(tmp_path / "not_created"))
    assert not (tmp_path / "not_created").exists()


def test_all_errors_reported_at_once_naming_fields():
    with pytest.raises(ConfigError) as e:
        DistillationConfig(
            temperature=-1, kd_loss_type="kld", kd_loss_weight=-0.5, temperature_scheduler="flsw",
            hard_label_weight_scheduler="cosine",
            intermediate_matches=[
                GOOD_MATCH,
                {"layer_T": 2, "layer_S": 1, "feature": "hiden", "loss": "hidden_mse", "weight": 1},
                {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "nst", "weight": -1},
                {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
                 "proj": ["conv", 32, "48"]},
                {"layer_T": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "bogus": 3},
            ])
    errors = e.value.errors
    text = "\n".join(errors)
    expected = [
        "DistillationConfig.temperature:",
        "DistillationConfig.kd_loss_type: unknown KD loss 'kld'",
        "DistillationConfig.kd_loss_weight: must be a number >= 0",
        "DistillationConfig.temperature_scheduler: 'flsw' needs parameters (beta, gamma)",
        "DistillationConfig.hard_label_weight_scheduler: unknown scheduler 'cosine'",
        "DistillationConfig.intermediate_matches[1].feature: must be one of ['hidden', 'attention']",
        "DistillationConfig.intermediate_matches[2].layer_T: loss 'nst' compares two layers",
        "DistillationConfig.intermediate_matches[2].weight: must be a number >= 0",
        "DistillationConfig.intermediate_matches[3].proj[0]: unknown projection 'conv'",
        "DistillationConfig.intermediate_matches[3].proj[2]: teacher dim must be an integer",
        "DistillationConfig.intermediate_matches[4].bogus: unknown key",
        "DistillationConfig.intermediate_matches[4].layer_S: required",
    ]
    for line in expected:
        assert line in text, f"missing {line!r} in\n{text}"
    assert not any("intermediate_matches[0]" in x for x in errors)


def test_training_config_errors():
    with pytest.raises(ConfigError) as e:
        TrainingConfig(gradient_accumulation_steps=0, ckpt_steps=-3, amp="fp8", device="tpu9", fp16="yes")
    text = str(e.value)
    for field in ("gradient_accumulation_steps", "ckpt_steps", "amp", "device", "fp16"):
        assert f"TrainingConfig.{field}:" in text


@pytest.mark.parametrize("spec", [["flsw", 1, 2], {"name": "flsw", "beta": 1, "gamma": 2}, ["cwsm", 1], "constant"])
def test_scheduler_specs_resolve(spec):
    cfg = DistillationConfig(temperature_scheduler=spec, kd_loss_weight_scheduler="linear_decay")
    assert callable(cfg.temperature_scheduler) and callable(cfg.kd_loss_weight_scheduler)
    assert cfg.to_dict()["temperature_scheduler"] == spec


def test_scheduler_bad_parameters_named():
    with pytest.raises(ConfigError, match=r"temperature_scheduler: bad parameters for 'cwsm'"):
        DistillationConfig(temperature_scheduler={"name": "cwsm", "alpha": 2})
    with pytest.raises(ConfigError, match=r"kd_loss_weight_scheduler: 'linear_decay' takes no parameters"):
        DistillationConfig(kd_loss_weight_scheduler=["linear_decay", 3])


def test_proj_gets_optimizer_settings_slot_without_mutating_input():
    match = dict(GOOD_MATCH, proj=["linear", 32, 48])
    cfg = DistillationConfig(intermediate_matches=[match])
    assert cfg.intermediate_matches[0].proj == ["linear", 32, 48, {}]
    assert match["proj"] == ["linear", 32, 48]


@pytest.mark.parametrize("ext", ["json", "yaml", "yml"])
def test_file_round_trip(tmp_path, ext):
    import yaml

    cfg = DistillationConfig(temperature=8, temperature_scheduler=["flsw", 1, 2], intermediate_matches=[GOOD_MATCH],
                             kd_loss_weight_scheduler="linear_decay", hard_label_weight=0.5)
    path = tmp_path / f"d.{ext}"
    text = json.dumps(cfg.to_dict()) if ext == "json" else yaml.safe_dump(cfg.to_dict())
    path.write_text(text)
    again = DistillationConfig.from_file(path)
    assert again == cfg
    assert again.to_dict()["intermediate_matches"][0]["proj"] == ["linear", 32, 48, {}]
    if ext == "json":
        assert DistillationConfig.from_json_file(path) == cfg
    else:
        assert DistillationConfig.from_yaml_file(path) == cfg


def test_from_dict_rejects_unknown_keys_with_source(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"output_dir": "x", "ckpt_frequncy": 2, "lr": 1}))
    with pytest.raises(ConfigError) as e:
        TrainingConfig.from_json_file(path)
    assert str(path) in str(e.value)
    assert "TrainingConfig.ckpt_frequncy: unknown field" in str(e.value)
    assert "TrainingConfig.lr: unknown field" in str(e.value)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        DistillationConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("temperature: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        DistillationConfig.from_file(bad)
    other = tmp_path / "cfg.toml"
    other.write_text("")
    with pytest.raises(ConfigError, match="unknown config extension"):
        DistillationConfig.from_file(other)


def test_cli_validate_reports_errors_without_traceback(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("kind: textbrewer\ntrain_config:\n  output_dir: out\ndistill_config:\n  temperature: 8\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: textbrewer\ntrain_config:\n  ckpt_frequency: 0\ndistill_config:\n  kd_loss_type: kld\n"
                   "extra: 1\n")
    ok = subprocess.run([sys.executable, "-m", "cachebrew", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "distill_config OK" in ok.stdout
    res = subprocess.run([sys.executable, "-m", "cachebrew", "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for s in ("train_config: TrainingConfig.ckpt_frequency", "distill_config: DistillationConfig.kd_loss_type",
              "extra: unknown section", str(bad)):
        assert s in res.stderr


def test_cli_main_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["validate", str(tmp_path / "nope.json")])
    assert e.value.code == 2
    assert "config file not found" in capsys.readouterr().err


def _valid_distill(tmp_path):
    return {"output_dir": str(tmp_path / "out"), "caches": [str(tmp_path / "c")], "student": {"config": {}},
            "train": {"epochs": 1}}


@pytest.mark.parametrize("field", ["epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
                                   "head_lr", "gradient_accumulation_steps", "amp", "shuffle_buffer", "num_workers",
                                   "eval_every", "save_every", "keep_checkpoints", "progress_bar", "log_steps",
                                   "verify_caches"])
@pytest.mark.parametrize("bad", ["2", [1], {"a": 1}])
def test_every_distill_train_field_rejects_a_wrong_type_by_name(tmp_path, field, bad):
    from cachebrew.recipes.distill import DistillRunConfig

    cfg = _valid_distill(tmp_path)
    cfg["train"][field] = bad
    with pytest.raises(ConfigError, match=rf"train\.{field}:"):
        DistillRunConfig.from_dict(cfg)


@pytest.mark.parametrize("field, bad", [("seed", "3"), ("tau", "1"), ("seed", True), ("tau", [1])])
def test_distill_top_level_wrong_types(tmp_path, field, bad):
    from cachebrew.recipes.distill import DistillRunConfig

    cfg = {**_valid_distill(tmp_path), field: bad}
    with pytest.raises(ConfigError, match=rf"{field}:"):
        DistillRunConfig.from_dict(cfg)


@pytest.mark.parametrize("field, bad", [("max_length", "128"), ("batch_size", True), ("shard_rows", 1.5),
                                        ("record_batch_rows", [256]), ("compression", 3), ("augment.copies", "2"),
                                        ("augment.copies", True)])
def test_export_wrong_types_are_config_errors(tmp_path, field, bad):
    from cachebrew.recipes.export import ExportConfig

    cfg = {"output": str(tmp_path / "c"), "teachers": [{"name": "t", "path": str(tmp_path)}],
           "data": {"path": str(tmp_path / "d.jsonl"), "text": "text"}}
    if "." in field:
        outer, inner = field.split(".")
        cfg[outer] = {inner: bad, "ops": [{"name": "masking", "p": 0.1}]}
    else:
        cfg[field] = bad
    with pytest.raises(ConfigError, match=rf"{field.split('.')[-1]}:"):
        ExportConfig.from_dict(cfg)


@pytest.mark.parametrize("field", ["epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
                                   "head_lr", "amp", "device", "progress_bar"])
@pytest.mark.parametrize("bad", [[1], {"a": 1}])
def test_every_finetune_train_field_rejects_a_wrong_type_by_name(tmp_path, field, bad):
    from cachebrew.recipes.finetune import FinetuneConfig

    cfg = {"output_dir": "o", "model": {"path": "m"}, "data": {"path": "d.csv"}, "train": {field: bad}}
    with pytest.raises(ConfigError, match=rf"train\.{field}: must be"):
        FinetuneConfig.from_dict(cfg)


def test_typed_builder_names_nested_paths_and_reports_everything_at_once():
    from cachebrew.recipes.distill import DistillRunConfig
    from cachebrew.recipes.export import ExportConfig

    with pytest.raises(ConfigError) as e:
        ExportConfig.from_dict({"output": "c", "teachers": [{"name": "a", "path": "p"}, {"name": 3, "path": "p"},
                                                            {"path": "p"}],
                                "data": {"path": "d", "limit": "10"}, "outputs": {"logits": "yes"}, "nope": 1})
    msgs = e.value.errors
    assert "teachers[1].name: must be a string, got 3" in msgs
    assert "teachers[2].name: required" in msgs
    assert "data.limit: must be an integer or null, got '10'" in msgs
    assert "outputs.logits: must be true or false, got 'yes'" in msgs
    assert any(m.startswith("nope: unknown field") for m in msgs)
    with pytest.raises(ConfigError) as e:
        DistillRunConfig.from_dict({"output_dir": "o", "student": {"config": {}}, "train": {"steps": 4},
                                    "tasks": {"a": {"caches": ["x"]}, "b": {"caches": 5}, "c": {"bogus": 1}}})
    assert "tasks.b.caches: must be a list or a string, got 5" in e.value.errors
    assert any(m.startswith("tasks.c.bogus: unknown field") for m in e.value.errors)
    # a single cache may be a string; `steps` alone is a step budget
    cfg = DistillRunConfig.from_dict({"output_dir": "o", "student": {"config": {}}, "caches": "c",
                                      "train": {"steps": 4}})
    assert cfg.caches == ["c"] and (cfg.train.epochs, cfg.train.steps) == (None, 4)


@pytest.mark.parametrize("text, kind, message", [
    ("output: c\nteachers: [{name: t, path: p}]\ndata: {path: d, text: text}\nmax_length: '9'\n", "export",
     "max_length: must be an integer"),
    ("output_dir: o\ncaches: [c]\nstudent: {config: {}}\ntrain: {lr: fast}\n", "distill", "train.lr: must be a number"),
    ("output_dir: o\nmodel: {path: m}\ndata: {path: d}\ntrain: {epochs: 0}\n", "train",
     "train.epochs: must be an integer >= 1"),
])
def test_cli_validate_checks_every_kind_of_config(tmp_path, text, kind, message):
    """The kind is stated in the file; without it validate asks for it (with what the file looks like), and the
    job commands refuse a config of another kind by name."""
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    res = subprocess.run([sys.executable, "-m", "cachebrew", "validate", str(path)], capture_output=True, text=True)
    assert res.returncode == 2 and "no kind: add `kind: <export|distill|train|textbrewer>`" in res.stderr
    assert f"(it looks like a{'n' if kind == 'export' else ''} {kind} config)" in res.stderr
    other = "train" if kind == "export" else "export"
    path.write_text(f"kind: {other}\n" + text)
    res = subprocess.run([sys.executable, "-m", "cachebrew", kind, str(path)], capture_output=True, text=True)
    assert res.returncode == 2 and f"kind: this is a '{other}' config; this command reads '{kind}' configs" \
        in res.stderr, res.stderr
    text = f"kind: {kind}\n" + text
    path.write_text(text)
    res = subprocess.run([sys.executable, "-m", "cachebrew", "validate", str(path)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in res.stderr and str(path) in res.stderr
    fixed = text.replace("'9'", "9").replace("fast", "0.001").replace("epochs: 0", "epochs: 1")
    path.write_text(fixed)
    ok = subprocess.run([sys.executable, "-m", "cachebrew", "validate", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and f"{kind} config OK" in ok.stdout, ok.stderr


def test_a_distill_config_reports_every_problem_at_its_path_in_one_pass():
    """The `distill:` section is checked with the rest of the config: unknown fields and bad values of it, and of
    `train:` (whose optimizer fields `cachebrew train` shares), all in one error, each at its path."""
    from cachebrew.recipes.distill import DistillRunConfig
    from cachebrew.recipes.finetune import FinetuneConfig

    with pytest.raises(ConfigError) as e:
        DistillRunConfig.from_dict({
            "output_dir": "x", "caches": ["c"], "student": {"path": "s"}, "train": {"lr": -1, "warmup_ratio": 1},
            "distill": {"temperature": "hot", "tempreature": 3, "kd_loss_type": "xx", "intermediate_matches": [
                {"layer_T": 1, "layer_S": 1, "feature": "hiden", "loss": "hidden_mse", "weight": 1}]}})
    paths = [m.split(":")[0] for m in e.value.errors]
    assert paths == ["train.lr", "train.warmup_ratio", "distill.tempreature", "distill.temperature",
                     "distill.kd_loss_type", "distill.intermediate_matches[0].feature"], e.value.errors
    with pytest.raises(ConfigError) as e:  # the same optimizer checks, from the one OptimizerConfig
        FinetuneConfig.from_dict({"output_dir": "x", "model": {"path": "m"}, "data": {"path": "d", "text": "t"},
                                  "train": {"lr": -1, "warmup_ratio": 1}})
    assert [m for m in e.value.errors if m.startswith("train.")] == [
        "train.lr: must be a number > 0, got -1", "train.warmup_ratio: must be a number in [0, 1), got 1"]
