"""`python -m pi_axera_sd_service ...`: the same CLI as `pi-axera-sd`."""

import sys

from pi_axera_sd_service.cli import main

sys.exit(main())
