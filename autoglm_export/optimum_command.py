"""``optimum-cli export autoglm``: the same export as ``autoglm-export``, for users who drive their
exporters through optimum's CLI. Same options, same one-line errors and exit codes (it calls the
Typer CLI's ``main``)."""

from __future__ import annotations

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .cli import TARGET_HELP


class AutoGLMExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="autoglm", help="Export an AutoGLM-Phone-9B / GLM-4.1V checkpoint to a verified on-device bundle."
    )

    @staticmethod
    def parse_args(parser) -> None:
        parser.add_argument("--target", required=True, help=TARGET_HELP)
        parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory.")
        parser.add_argument("--out", required=True, help="Bundle directory to create.")
        parser.add_argument("--recipe", help="Recipe YAML (default: recipes/<target>.yaml).")
        parser.add_argument("--force", action="store_true", help="Replace an existing --out (a bundle only).")
        parser.add_argument("-q", "--quiet", action="store_true", help="No progress output.")

    def run(self) -> None:
        import sys

        from .cli import main

        a = self.args
        argv = ["export", "--target", a.target, "--checkpoint", a.checkpoint, "--out", a.out]
        argv += ["--recipe", a.recipe] if a.recipe else []
        argv += ["--force"] if a.force else []
        argv += ["-q"] if a.quiet else []
        code = main(argv)
        if code:
            sys.exit(code)
