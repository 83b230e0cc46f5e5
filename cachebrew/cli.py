"""The `cachebrew` command line. Thin: parse, call the library, print a user's mistakes as one line.

    cachebrew export CONFIG.yaml [--set key=value]   # teachers -> cache
    cachebrew distill CONFIG.yaml [--resume]         # cache -> student

Every command's --help lists its options; docs/cli.md is the reference. A usage error (unknown command or
option, missing argument, bad value) or a bad config prints one `error: ...` line on stderr and exits 2.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup

from .version import __version__
from .core.config import read_config_file
from .errors import CachebrewError, ConfigError

# one example a paragraph: typer's help keeps a paragraph's line breaks in some versions and not in others
EXAMPLES = "\n\n".join([
    "Examples:",
    "cachebrew export export.yaml  # teachers run once -> cache/ (manifest.json + part-*.arrow)",
    "cachebrew inspect cache/  # schema, rows, sizes, fingerprint, a sample",
    "cachebrew distill distill.yaml  # a student from the cache; --resume continues a killed run",
    "cachebrew evaluate runs/student/best test.parquet  # accuracy or F1, size, inference examples/s",
    "cachebrew push cache/ s3://team/caches/rt  # share a cache: pull, ls, pack and unpack work alike",
    "cachebrew validate distill.yaml  # every problem in a config, at once",
    "Exit status: 0 ok, 1 a check failed (verify), 2 a usage or config error, 130 interrupted. "
    "Reference: docs/cli.md",
])

WORKFLOW, SHARING, UTILITIES = "Workflow", "Sharing caches", "Utilities"


class CommandsInWorkflowOrder(TyperGroup):
    """Lists commands in the order they are defined (the order a user runs them), not alphabetically."""

    def list_commands(self, ctx):
        return list(self.commands)

    def resolve_command(self, ctx, args):
        """click's own, with "Did you mean ...?" for a mistyped command on every click (8.1 has none)."""
        try:
            return super().resolve_command(ctx, args)
        except Exception as e:
            if _is_click(e, "UsageError") and args and args[0] not in self.commands and "Did you mean" not in e.message:
                close = difflib.get_close_matches(args[0], list(self.commands), n=1)
                e.message += f" Did you mean {close[0]!r}?" if close else ""
            raise


def _print_version(value: bool):
    if value:
        version()
        raise typer.Exit()


app = typer.Typer(cls=CommandsInWorkflowOrder, add_completion=False, no_args_is_help=True,
                  rich_markup_mode="rich", epilog=EXAMPLES,
                  help="Knowledge distillation with a teacher cache: export teachers once, distill many students.")


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                            help="print the cachebrew, torch and pyarrow versions and exit")):
    """Knowledge distillation with a teacher cache: export teachers once, distill many students."""


PROGRESS = "show progress bars and transformers' load reports (--no-progress: one log line per step, for CI)"


SECTIONS = ("train_config", "distill_config")  # TextBrewer's TrainingConfig / DistillationConfig, in one file


KINDS = ("export", "distill", "train", "textbrewer")


def config_kind(data: dict) -> str | None:
    """Which kind of config a file without `kind:` seems to hold, from its top-level keys: only a hint in the error
    that asks for the kind (a guess would validate a file as what it is not)."""
    if set(data) & set(SECTIONS):
        return "textbrewer"
    if "teachers" in data and ("output" in data or "data" in data):
        return "export"
    if {"caches", "tasks", "student", "distill"} & set(data):
        return "distill"
    if "model" in data:
        return "train"
    return None


def validate_file(path: Path, kind: str | None = None) -> dict:
    """Validate a config file of any kind: export, distill, train (`cachebrew train`), or TextBrewer's
    `train_config` / `distill_config` sections. Returns {what: config}; a ConfigError lists every problem."""
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping", str(path))
    stated = data.get("kind")
    if kind is not None and stated is not None and kind != stated:
        raise ConfigError(f"--kind {kind} but the file says kind: {stated}", str(path))
    kind = kind or stated
    if kind is None:
        looks = config_kind(data)
        hint = f" (it looks like a{'n' if looks == 'export' else ''} {looks} config)" if looks else ""
        raise ConfigError(f"no kind: add `kind: <{'|'.join(KINDS)}>` at the top of the file or pass --kind{hint}",
                          str(path))
    if kind not in KINDS:
        where = "--kind" if stated is None else "kind"
        raise ConfigError(f"{where}: one of {', '.join(KINDS)}, got {kind!r}", str(path))
    if kind != "textbrewer":
        from .recipes.distill import DistillRunConfig
        from .recipes.export import ExportConfig
        from .recipes.finetune import FinetuneConfig

        cls = {"export": ExportConfig, "distill": DistillRunConfig, "train": FinetuneConfig}[kind]
        return {f"{kind} config": cls.from_dict(data, str(path))}
    unknown = [k for k in data if k not in (*SECTIONS, "kind")]
    errors = [f"{k}: unknown section (valid: {', '.join(SECTIONS)})" for k in unknown]
    configs = {}
    from .configurations import DistillationConfig, TrainingConfig

    for key, cls in zip(SECTIONS, (TrainingConfig, DistillationConfig)):
        if key in data:
            try:
                configs[key] = cls.from_dict(data[key] or {})
            except ConfigError as e:
                errors += [f"{key}: {msg}" for msg in e.errors]
    if errors:
        raise ConfigError(errors, str(path))
    return configs


@app.command(rich_help_panel=WORKFLOW)
def export(config: Path = typer.Argument(..., help="export config (YAML or JSON)"),
           set_: list[str] = typer.Option([], "--set", help="override a config value: key.sub=value (YAML value)"),
           output: str = typer.Option(None, help="cache directory (overrides `output`)"),
           overwrite: bool = typer.Option(False, help="replace a cache made from other inputs"),
           progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS)):
    """Run the teachers once over the data and write a sharded Arrow cache."""
    from .recipes.export import ExportConfig, run_export

    overrides = list(set_) + ([f"output={output}"] if output else []) + (["overwrite=true"] if overwrite else [])
    overrides += [] if progress else ["progress_bar=false"]
    _setup_logging(quiet=not progress)
    result = run_export(ExportConfig.from_file(config, overrides))
    if result.skipped:
        _say(f"{result.output}: up to date (fingerprint {result.fingerprint[:12]}…), nothing to do")
        return
    per_row = result.bytes_total / max(result.rows_total, 1)
    _say(f"{result.output}: {result.rows_total} rows in {result.shards_written + result.shards_resumed} shards "
               f"({result.shards_resumed} resumed), {result.bytes_total / 2**20:.2f} MiB, {per_row:,.0f} bytes/row, "
               f"{result.rows_per_second:,.1f} rows/s, fingerprint {result.fingerprint[:12]}…")


@app.command(rich_help_panel=WORKFLOW)
def inspect(cache: str = typer.Argument(..., help="cache directory or URI (s3://bucket/cache, ...)"),
            rows: int = typer.Option(1, help="sample rows to print")):
    """Show a cache's schema, rows, sizes, fingerprint and a sample."""
    from .cache import CacheReader

    reader = CacheReader(cache)
    m = reader.manifest
    typer.echo(f"cache        {cache}")
    typer.echo(f"fingerprint  {m.fingerprint}")
    typer.echo(f"created      {m.created}  (cachebrew {m.fingerprint_inputs.get('cachebrew')}, "
               f"torch {m.fingerprint_inputs.get('torch')})")
    typer.echo(f"rows         {m.num_rows} ({m.num_examples} examples), tasks {m.tasks}")
    typer.echo(f"shards       {len(m.shards)}, {m.num_bytes / 2**20:.2f} MiB on disk, "
               f"{m.num_bytes / max(m.num_rows, 1):,.0f} bytes/row")
    for name, info in m.teachers.items():
        typer.echo(f"teacher      {name}: {info.get('source')} (weights {info['weights_sha256'][:12]}…)")
    typer.echo("columns:")
    table = reader.open_shard(m.shards[0]) if m.shards else None
    for name, typ in m.columns.items():
        size = ""
        if table is not None and table.num_rows:
            size = f"{table.column(name).nbytes / table.num_rows:,.0f} B/row uncompressed"
        typer.echo(f"  {name:<28} {typ:<22} {size}")
    for spec in m.tensors:
        typer.echo(f"  tensor {spec.column}: shape {spec.shape} stored as {spec.dtype}"
                   + (f", top-{spec.topk}" if spec.topk else ""))
    if table is not None:
        for r in reader.read_rows(table.slice(0, rows)):
            typer.echo("sample: " + ", ".join(f"{k}={_short(v)}" for k, v in r.items()))


def _short(v):
    import numpy as np
    import torch

    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    if isinstance(v, np.ndarray):
        return f"[{', '.join(map(str, v[:6]))}{', …' if len(v) > 6 else ''}] (len {len(v)})"
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "…"


@app.command(rich_help_panel=WORKFLOW)
def verify(cache: str = typer.Argument(..., help="cache directory or URI")):
    """Check every shard's checksum, row count and schema; exit 1 naming each bad shard."""
    from .cache import CacheReader

    reader = CacheReader(cache)
    problems = reader.verify()
    if problems:
        for p in problems:
            typer.echo(f"{cache}/{p}", err=True)
        typer.echo(f"{cache}: {len(problems)} bad shard(s) of {len(reader.manifest.shards)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{cache}: OK ({len(reader.manifest.shards)} shards, {reader.num_rows} rows)")


@app.command(rich_help_panel=WORKFLOW)
def distill(config: Path = typer.Argument(..., help="distill config (YAML or JSON)"),
            set_: list[str] = typer.Option([], "--set", help="override a config value: key.sub=value (YAML value)"),
            resume: bool = typer.Option(False, help="continue the run in output_dir from its last checkpoint"),
            progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS)):
    """Train a student from teacher caches (no teacher in memory); evaluate, keep best and last."""
    from .recipes.distill import DistillRunConfig, run_distill

    overrides = list(set_) + ([] if progress else ["train.progress_bar=false"])
    _setup_logging(quiet=not progress)
    result = run_distill(DistillRunConfig.from_file(config, overrides), resume=resume)
    msg = f"{result.output_dir}: {result.global_step} steps, {result.examples_per_second:,.1f} examples/s"
    if result.best:
        msg += f"; best {_fmt_scores(result.best)}"
    if result.teacher:
        msg += f"; teacher {_fmt_scores(result.teacher)}"
    _say(msg)


def _fmt_scores(row: dict) -> str:
    parts = []
    for task, m in row.items():
        if isinstance(m, dict):
            parts += [f"{task}.{k}={v}" if isinstance(v, int) else f"{task}.{k}={v:.4f}" for k, v in m.items()]
    return ", ".join(parts)


@app.command(rich_help_panel=WORKFLOW)
def evaluate(model: Path = typer.Argument(..., help="saved model directory"),
             data: Path = typer.Argument(..., help="data file (csv/jsonl/parquet) or saved dataset"),
             text: str = typer.Option(None, help="text column"), tokens: str = typer.Option(None, help="word-list column"),
             label: str = typer.Option("label", help="label column"),
             max_length: int = typer.Option(128, help="longest input in tokens (longer inputs are truncated); "
                                                      "use the length the model was trained with"),
             output: Path = typer.Option(None, help="write the JSON result here too"),
             device: str = typer.Option(None, help="cpu, cuda, cuda:1, ...; default: CUDA if available, else CPU"),
             task: str = typer.Option(None, help="task of a multi-task student"),
             progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS)):
    """Accuracy (or entity F1), parameters, size and inference examples/s of a model on a split."""
    import json as _json

    _setup_logging(quiet=not progress)
    from .components.data import DataConfig
    from .recipes.finetune import run_evaluate

    if (text is None) == (tokens is None):
        text = text or "text"
    res = run_evaluate(str(model), DataConfig(path=str(data), text=None if tokens else text, tokens=tokens,
                                              label=label), max_length, device=device, task=task)
    line = _json.dumps(res, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(line)
    typer.echo(line)


@app.command(rich_help_panel=WORKFLOW)
def train(config: Path = typer.Argument(..., help="fine-tuning config (YAML or JSON)"),
          set_: list[str] = typer.Option([], "--set", help="override a config value: key.sub=value"),
          progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS)):
    """Fine-tune a model on labelled data (a teacher, or a student without distillation)."""
    from .recipes.finetune import FinetuneConfig, run_finetune

    _setup_logging(quiet=not progress)
    overrides = list(set_) + ([] if progress else ["train.progress_bar=false"])
    res = run_finetune(FinetuneConfig.from_file(config, overrides))
    _say(f"trained on {res['num_train']} examples; best dev {res['best']}")


@app.command(rich_help_panel=SHARING)
def push(cache: str = typer.Argument(..., help="local cache directory (or any cache location)"),
         uri: str = typer.Argument(..., help="destination: s3://bucket/path, gs://..., file://..., or a directory"),
         overwrite: bool = typer.Option(False, help="replace a different cache at the destination")):
    """Copy a cache to shared storage: sha256-verified, resumable, manifest published last."""
    _copy(cache, uri, overwrite)


@app.command(rich_help_panel=SHARING)
def pull(uri: str = typer.Argument(..., help="source cache URI (or directory)"),
         directory: str = typer.Argument(..., help="local destination directory"),
         overwrite: bool = typer.Option(False, help="replace a different cache in the directory")):
    """Copy a shared cache to a local directory: sha256-verified, resumable, manifest written last."""
    _copy(uri, directory, overwrite)


def _copy(src, dst, overwrite):
    import time

    from .cache.sharing import copy_cache

    t = time.perf_counter()
    report = copy_cache(src, dst, overwrite=overwrite,
                        progress=lambda info: typer.echo(f"  {info.path} ({info.bytes / 2**20:.2f} MiB) verified"))
    typer.echo(f"{src} -> {dst}: {report.copied} shard(s) copied ({report.bytes / 2**20:.2f} MiB), "
               f"{report.skipped} already there, {time.perf_counter() - t:.1f} s")


@app.command("ls", rich_help_panel=SHARING)
def ls(root: str = typer.Argument(..., help="directory or URI to search for caches"),
       depth: int = typer.Option(4, help="how many levels below ROOT to look")):
    """List the caches under ROOT: teachers, data, rows, size, fingerprint, creation date."""
    from .cache import CacheReader
    from .cache.sharing import find_caches

    found = find_caches(root, depth)
    if not found:
        typer.echo(f"{root}: no caches (no manifest.json within {depth} levels)")
        return
    header = f"{'cache':<40} {'teachers':<24} {'data':<28} {'rows':>8} {'MiB':>8} {'fingerprint':<13} created"
    typer.echo(header)
    for loc in found:
        name = loc.split("?")[0]  # without connection options
        try:
            m = CacheReader(loc).manifest
        except CachebrewError as e:
            typer.echo(f"{name:<40} unreadable: {e}")
            continue
        teachers = ",".join(f"{n}({Path(str(t.get('source', '?'))).name})" for n, t in m.teachers.items())
        data = Path(str(m.config.get("data", {}).get("path", "?"))).name
        typer.echo(f"{name:<40} {teachers[:24]:<24} {data[:28]:<28} {m.num_rows:>8} {m.num_bytes / 2**20:>8.2f} "
                   f"{m.fingerprint[:12]:<13} {m.created[:19]}")


@app.command(rich_help_panel=SHARING)
def pack(cache: str = typer.Argument(..., help="cache directory or URI"),
         bundle: Path = typer.Argument(..., help="the bundle file to write, e.g. cache.tar.zst"),
         level: int = typer.Option(3, help="zstd level (the shards are compressed already; higher gains little)")):
    """Write a cache as one .tar.zst file: shards sha256-checked on the way in, the file published atomically."""
    from .cache.bundle import pack_cache

    report = pack_cache(cache, bundle, level=level,
                        progress=lambda info: typer.echo(f"  {info.path} ({info.bytes / 2**20:.2f} MiB) verified"))
    typer.echo(f"{cache} -> {bundle}: {report.shards} shard(s), {report.rows} rows, {report.bytes / 2**20:.2f} MiB")


@app.command(rich_help_panel=SHARING)
def unpack(bundle: Path = typer.Argument(..., help="a bundle written by `cachebrew pack`"),
           directory: Path = typer.Argument(..., help="new or empty directory for the cache")):
    """Extract a bundle safely (plain cache files only), verify every shard, then publish the directory."""
    from .cache.bundle import unpack_cache

    report = unpack_cache(bundle, directory)
    typer.echo(f"{bundle} -> {directory}: OK ({report.shards} shards, {report.rows} rows, verified)")


@app.command(rich_help_panel=UTILITIES)
def validate(config: Path = typer.Argument(..., help="any config file: export, distill, train, or TextBrewer's "
                                                    "train_config / distill_config sections"),
             kind: str = typer.Option(None, help=f"one of {', '.join(KINDS)}; default: the file's `kind:` key")):
    """Check a config file and list every problem, naming the field."""
    configs = validate_file(config, kind)
    for key, cfg in configs.items():
        typer.echo(f"{config}: {key} OK")


@app.command(rich_help_panel=UTILITIES)
def version():
    """Print the cachebrew, torch and pyarrow versions."""
    import pyarrow
    import torch

    typer.echo(f"cachebrew {__version__} (torch {torch.__version__}, pyarrow {pyarrow.__version__})")


def _rank0() -> bool:
    """Whether this process prints the job's log and summary: not launched by torchrun, or its rank 0."""
    from .core.runtime import launch_env

    return launch_env()[1] == 0


def _say(line: str) -> None:
    """A command's result line, printed once per job (by rank 0 under torchrun)."""
    if _rank0():
        typer.echo(line)


def _setup_logging(quiet: bool = False):
    """cachebrew's own INFO log; with `quiet` (--no-progress, for pipelines and CI logs) also no progress bars
    or load reports from transformers and datasets (a truncated student's unused layers are expected there)."""
    import logging

    # under torchrun, rank 0 speaks for the job: the other ranks log warnings and errors only
    level = logging.INFO if _rank0() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR if quiet else logging.WARNING)
    if quiet:
        try:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:  # transformers is optional for exports of entry-point teachers
            pass
        import datasets

        datasets.disable_progress_bars()


def _is_click(error: BaseException, name: str) -> bool:
    """Whether `error` is click's exception class `name`. Typer >= 0.23 raises the exceptions of the click it
    bundles (`typer._click`), which are not subclasses of the installed click's: match by class name and module."""
    return any(c.__name__ == name and "click" in c.__module__ for c in type(error).__mro__)


def _usage_error_line(error: BaseException) -> str:
    """click's message (with its hint, e.g. "Did you mean 'export'?") and where help is, on one line."""
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "cachebrew --help"
    return f"error: {message} (see '{where}')"


def main(argv=None):
    """The console script: a user's mistake is one `error: ...` line on stderr and exit status 2."""
    try:
        # standalone_mode=False: click raises usage errors to us (printed as one line below) instead of
        # printing its own multi-line usage box, and returns typer.Exit's code instead of calling sys.exit
        args = sys.argv[1:] if argv is None else list(argv)
        rc = app(args=args or ["--help"], standalone_mode=False, prog_name="cachebrew")  # no args: the help
    except CachebrewError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        typer.echo(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click's own exceptions, from either click (see _is_click); anything else is a bug
        if _is_click(e, "ClickException"):
            typer.echo(_usage_error_line(e), err=True)
            sys.exit(2 if _is_click(e, "UsageError") else e.exit_code)
        if _is_click(e, "Abort"):
            typer.echo("aborted", err=True)
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
