import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))  # the command line's errors, as `bpfring bench` reports them
