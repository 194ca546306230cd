"""firmware-sim: a simulated keyfleet device (measured boot into swtpm, serial console)."""
