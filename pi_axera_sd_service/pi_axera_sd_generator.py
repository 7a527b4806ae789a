"""The entry the upstream systemd unit names: `python pi_axera_sd_service/pi_axera_sd_generator.py`.

Runs the command line in `cli.py` (no subcommand means `serve`), also when run as a file from a
checkout: the package is then imported from the checkout, not from this folder's modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    _PKG_DIR = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PKG_DIR]
    sys.path.insert(0, str(_PKG_DIR.parent))

from pi_axera_sd_service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
