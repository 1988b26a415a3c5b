"""The command line: one thin module per command, each calling a library function."""
