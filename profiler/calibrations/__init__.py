"""Calibrations shipped with moespec (`moespec calibrate` output), one JSON per backend."""
