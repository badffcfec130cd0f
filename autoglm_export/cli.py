"""Thin Typer CLI: every command maps its arguments onto one library function.

User mistakes arrive as ``ExportError`` and are printed as one line (exit code 2, or 1 for a
failed parity gate); no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import ExportError
from .progress import quiet_third_party_logs
from .targets.table import TARGETS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export GLM-4.1V / AutoGLM-Phone-9B checkpoints to verified on-device bundles.\n\n"
    "Main use: autoglm-export --target xnnpack --checkpoint CKPT --out DIR [--recipe FILE] [--force]",
)
recipes_app = typer.Typer(help="List and validate quantization/shape recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

TARGET_HELP = "Target: " + " | ".join(TARGETS)


def _export(target, checkpoint, out, recipe, force, quiet):
    from .pipeline import export
    from .progress import Progress

    missing = [n for n, v in (("--target", target), ("--checkpoint", checkpoint), ("--out", out)) if v is None]
    if missing:
        raise ExportError(
            "missing option(s) " + ", ".join(missing),
            fix="autoglm-export --target xnnpack --checkpoint CKPT --out DIR",
        )
    report = export(checkpoint=checkpoint, target=target, out=out, recipe=recipe, force=force, progress=Progress(quiet))
    if not report["passed"]:
        from .errors import VerificationFailed

        raise VerificationFailed(
            "bundle written but parity gates failed: " + ", ".join(report["failed"]),
            file=Path(out) / "report.json",
            fix="see report.json; a lowering bug or a too-aggressive recipe rule is the usual cause",
        )


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    target: Optional[str] = typer.Option(None, "--target", help=TARGET_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Hugging Face checkpoint directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bundle directory to create."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe YAML (default: recipes/<target>.yaml)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    if ctx.invoked_subcommand is None:
        if target is None and checkpoint is None and out is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        _export(target, checkpoint, out, recipe, force, quiet)


@app.command("export")
def export_cmd(
    target: str = typer.Option(..., "--target", help=TARGET_HELP),
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    out: Path = typer.Option(..., "--out"),
    recipe: Optional[Path] = typer.Option(None, "--recipe"),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Same as the top-level --target/--checkpoint/--out form."""
    _export(target, checkpoint, out, recipe, force, quiet)


@app.command("inspect")
def inspect_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (weights optional)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Architecture, components, parameter counts and estimated INT4/FP16 sizes."""
    from .inspection import describe, format_table

    info = describe(checkpoint)
    typer.echo(json.dumps(info, indent=2) if as_json else format_table(info))


@app.command("tiny-checkpoint")
def tiny_cmd(
    out: Path = typer.Argument(..., help="Directory to create."),
    seed: int = typer.Option(0, "--seed"),
    preset: str = typer.Option("tiny", "--preset", help="tiny | guard | 9b-shape"),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="Decoder layers (default: the preset's)."),
    vision_depth: Optional[int] = typer.Option(None, "--vision-depth", min=1, help="ViT blocks."),
    audio: bool = typer.Option(False, "--audio", help="Add a GLM-ASR audio tower (audio_config, audio token ids)."),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write a random checkpoint in the real GLM-4.1V layout."""
    from .progress import Progress
    from .tiny import write_tiny_checkpoint

    p = Progress(quiet)
    write_tiny_checkpoint(
        out,
        seed=seed,
        preset=preset,
        layers=layers,
        vision_depth=vision_depth,
        audio=audio,
        force=force,
        progress=p.stage("tiny-checkpoint"),
    )
    p(f"wrote {out}", "tiny-checkpoint")


@app.command("verify")
def verify_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    against: Optional[str] = typer.Option(None, "--against", help="Independent runtime to compare with."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint (default: the manifest's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Re-run the parity gates of a bundle; exit 0 only when every gate passes."""
    from .progress import Progress
    from .verify import verify_bundle

    report = verify_bundle(bundle, checkpoint=checkpoint, against=against, progress=Progress(quiet))
    if not report["passed"]:
        from .errors import VerificationFailed

        raise VerificationFailed(
            "parity gates failed: " + ", ".join(report["failed"]),
            file=bundle,
            fix="see the table above; re-export or relax the recipe rule for that component",
        )


@app.command("run")
def run_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The user turn's text."),
    prompt_file: Optional[str] = typer.Option(
        None, "--prompt-file", help="Read the text from a file ('-': standard input)."
    ),
    allow_failed: bool = typer.Option(
        False, "--allow-failed", help="Run a bundle whose parity gates failed at export."
    ),
    image: Optional[Path] = typer.Option(None, "--image", help="PNG/JPEG; resized to the bundle's image size."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="WAV/FLAC (bundles with an audio encoder)."),
    order: str = typer.Option("image,audio,text", "--order", help="Order of the parts in the user turn."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt before the user turn."),
) -> None:
    """Generate text from a bundle (streams tokens to stdout)."""
    from .runner import read_prompt, run_bundle

    text = read_prompt(prompt, prompt_file)
    run_bundle(
        bundle,
        prompt=text,
        image=image,
        audio=audio,
        order=order,
        max_new_tokens=max_new_tokens,
        system=system,
        allow_failed=allow_failed,
        write=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
        warn=lambda s: print(s, file=sys.stderr),
    )
    sys.stdout.write("\n")


@app.command("serve")
def serve_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    model_name: str = typer.Option("autoglm-phone-9b", "--model-name", help="The model id clients ask for."),
    allow_files: Optional[Path] = typer.Option(
        None, "--allow-files", help="Serve file:// image/audio URLs under this directory."
    ),
    max_queue: int = typer.Option(
        8, "--max-queue", min=1, help="Requests admitted at once (running + waiting); 429 beyond."
    ),
    allow_failed: bool = typer.Option(
        False, "--allow-failed", help="Serve a bundle whose parity gates failed at export."
    ),
) -> None:
    """OpenAI-compatible chat service on a bundle: POST /v1/chat/completions, GET /v1/models, /health, /docs."""
    from .serve.app import serve

    serve(
        bundle,
        host=host,
        port=port,
        model_name=model_name,
        allow_files=allow_files,
        max_queue=max_queue,
        allow_failed=allow_failed,
        say=lambda s: print(s, file=sys.stderr, flush=True),
        warn=lambda s: print(s, file=sys.stderr, flush=True),
    )


@recipes_app.command("list")
def recipes_list() -> None:
    """Shipped recipes."""
    from .recipe import list_recipes

    for name, path, r in list_recipes():
        typer.echo(f"{name:<20} target={r.target:<9} {path}")


@recipes_app.command("validate")
def recipes_validate(file: Path = typer.Argument(...)) -> None:
    """Validate a recipe file; reports every problem at once."""
    from .recipe import load_recipe

    r = load_recipe(file)
    typer.echo(f"{file}: ok (target {r.target}, {len(r.quantization)} quantization rules)")


def _interrupted() -> str:
    from .fsutil import completed

    if completed:  # the signal came while the finished output was being renamed into place
        return f"interrupted after {completed[-1]} was complete and written"
    return "interrupted: nothing was written"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_logs()
    # a shell that starts us in the background hands down SIGINT as ignored; Ctrl-C must still work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        rv = app(args=argv, prog_name="autoglm-export", standalone_mode=False)
        if rv == 130:  # typer turns KeyboardInterrupt into a returned exit code
            print(_interrupted(), file=sys.stderr)
        return rv if isinstance(rv, int) else 0
    except ExportError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # typer's vendored click: usage errors (missing or bad options)
        if hasattr(e, "show"):
            e.show()
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        print(_interrupted(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
