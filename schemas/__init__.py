"""JSON Schemas shipped inside the wheel (mapped to the package `moespec.schemas`)."""
