"""TUI tests: pilot tests on a scripted engine and a tiny random model, replay tests, snapshots."""
