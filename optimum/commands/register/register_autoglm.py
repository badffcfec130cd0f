"""``optimum-cli export autoglm``: optimum loads every module of the ``optimum.commands.register``
namespace (PEP 420: no ``__init__.py`` here) and registers its ``REGISTER_COMMANDS``. Kept light:
the command imports autoglm_export only when it runs."""

from optimum.commands.export.base import ExportCommand

from autoglm_export.optimum_command import AutoGLMExportCommand

REGISTER_COMMANDS = [(AutoGLMExportCommand, ExportCommand)]
