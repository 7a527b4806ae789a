"""Process exit codes of `pi-axera-sd` (one home: the CLI, the server and the systemd unit use these).

A configuration error will not fix itself by restarting, so the unit lists CONFIG_EXIT_CODES in
`RestartPreventExitStatus=`; a runtime failure (EXIT_FAILURE) is restarted by systemd.
"""

EXIT_OK = 0
EXIT_FAILURE = 1      # runtime failure (the HTTP server stopped, a generation failed): worth a restart
EXIT_USAGE = 2        # argparse: unknown flag or bad value on the command line
EXIT_CONFIG = 3       # configuration: bad setting, model files missing or not matching, port unavailable
EXIT_MODEL_LOAD = 4   # serve: the models failed to load after the port opened
EXIT_INTERRUPTED = 130  # Ctrl-C in a one-shot command

CONFIG_EXIT_CODES = (EXIT_USAGE, EXIT_CONFIG, EXIT_MODEL_LOAD)
