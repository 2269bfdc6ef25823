"""SEDAC Chat's terminal UI and the `sedac-chat` command line."""
