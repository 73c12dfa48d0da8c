"""The command line: `kp` and its commands (`commands`), and the terminal's noise filtered (`terminal`)."""
