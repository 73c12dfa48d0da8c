"""`python -m pipeline ...` is the same command line as `kp ...`."""
from pipeline.cli.commands import main

main()
