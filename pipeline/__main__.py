"""`python -m pipeline ...` is the same command line as `kp ...`."""
from pipeline.cli import main

main()
