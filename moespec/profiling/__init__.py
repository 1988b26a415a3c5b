"""Measuring the compiled model for real (`moespec profile`) and fitting the simulator's
backend to the machine (`moespec calibrate`). Imports torch: the CLI loads it lazily."""
