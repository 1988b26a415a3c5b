"""`python -m moespec ...` (also what `torchrun -m moespec` runs)."""

from moespec.cli.app import main

main()
