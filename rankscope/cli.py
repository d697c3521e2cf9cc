"""The ``rankscope`` command: a thin layer over the Python API.

Every command prints a short summary for people and can write JSON for machines. Bad input
ends in one line ``Error: ...`` on stderr and exit status 2, never a traceback. Heavy imports
(matplotlib, torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import RankscopeError

FORMAT_CHOICES = ["peft", "kohya", "diffusers-legacy", "diffusers-peft", "mlx", "torchtune"]


def emit_json(text: str, target: str, human_lines: list[str]) -> None:
    """JSON to a file (atomically) or to stdout with '-'; the human summary then goes to stderr."""
    from .atomic import write_text

    if target == "-":
        for line in human_lines:
            click.echo(line, err=True)
        click.echo(text)
    else:
        write_text(target, text + "\n")
        for line in human_lines:
            click.echo(line)
        click.echo(f"  json           {target}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def cli() -> None:
    """See how unequal the ranks of a LoRA adapter are, and what to do about it.

    Reads PEFT adapters (and HF Trainer checkpoint-N series), kohya, diffusers, mlx-lm and
    torchtune files, and BeamLoRA runs. Start with: rankscope analyze PATH --out report/
    """


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for plots (deciles.png, heatmap.png) and analysis.json.")
@click.option("--json", "json_target", metavar="FILE|-", help="Write the analysis as JSON to FILE, or to stdout with '-'.")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), help="Force the checkpoint format instead of detecting it.")
@click.option("--spectrum/--no-spectrum", default=True, show_default=True,
              help="Also compute each update's singular values (basis-independent view).")
@click.option("--progress/--no-progress", default=None, help="Progress bar over snapshots (default: when stderr is a terminal).")
def analyze(path: Path, out_dir: Path | None, json_target: str | None, format_: str | None, spectrum: bool,
            progress: bool | None) -> None:
    """Per-rank importance of every LoRA module in PATH.

    PATH is a checkpoint file, an adapter folder, or a run folder of snapshots
    (checkpoint-N/, step-N/, mlx-lm NNNNNNN_adapters.safetensors). Importance of rank i is
    ‖scale·b_i a_iᵀ‖_F = scale·‖b_i‖·‖a_i‖, in float64, in the checkpoint's rank order.
    """
    from .analysis import analyze as run_analysis
    from .report import summary_lines, to_json

    document = run_analysis(path, format=format_, spectrum=spectrum, progress=progress)
    lines = summary_lines(document)
    if out_dir is not None:
        from .atomic import write_text
        from .plotting import plot_analysis

        for plot in plot_analysis(document, out_dir):
            lines.append(f"  plot           {plot}")
        write_text(out_dir / "analysis.json", to_json(document) + "\n")
        lines.append(f"  json           {out_dir / 'analysis.json'}")
    if json_target:
        emit_json(to_json(document), json_target, lines)
    else:
        for line in lines:
            click.echo(line)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn bad input into one ``Error:`` line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="rankscope", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except RankscopeError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # permission denied, disk full, ...: say what and where
        click.echo(f"Error: {e.strerror or e} ({e.filename or 'no file named'})", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
