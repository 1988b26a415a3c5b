"""Hardware descriptions shipped inside the wheel (mapped to the package `moespec.backends`)."""
