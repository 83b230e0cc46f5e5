"""The `cachebrew` command line. Thin: parse, call the library, print errors without tracebacks.

    cachebrew version
    cachebrew validate CONFIG.yaml     # report every problem in a config at once
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from . import __version__
from .configurations import DistillationConfig, TrainingConfig, _read_file
from .errors import CachebrewError, ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Knowledge distillation with a teacher cache: export teachers once, distill many students.")

SECTIONS = {"train_config": TrainingConfig, "distill_config": DistillationConfig}


def validate_file(path: Path) -> dict:
    """Validate a config file whose top level holds `train_config` and/or `distill_config` sections."""
    data = _read_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping with sections {sorted(SECTIONS)}", str(path))
    unknown = [k for k in data if k not in SECTIONS]
    errors = [f"{k}: unknown section (valid: {', '.join(SECTIONS)})" for k in unknown]
    configs = {}
    for key, cls in SECTIONS.items():
        if key in data:
            try:
                configs[key] = cls.from_dict(data[key] or {})
            except ConfigError as e:
                errors += [f"{key}: {msg}" for msg in e.errors]
    if errors:
        raise ConfigError(errors, str(path))
    if not configs:
        raise ConfigError(f"no section found; expected one of {sorted(SECTIONS)}", str(path))
    return configs


@app.command()
def version():
    """Print the cachebrew, torch and pyarrow versions."""
    import pyarrow
    import torch

    typer.echo(f"cachebrew {__version__} (torch {torch.__version__}, pyarrow {pyarrow.__version__})")


@app.command()
def validate(config: Path = typer.Argument(..., help="YAML or JSON file with train_config / distill_config")):
    """Check a config file and list every problem, naming the field."""
    configs = validate_file(config)
    for key, cfg in configs.items():
        typer.echo(f"{config}: {key} OK")


def main(argv=None):
    try:
        app(args=argv, standalone_mode=False)
    except CachebrewError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
