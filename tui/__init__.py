"""tui: the terminal interfaces — the `trace` command (cli.py), rich rendering, the Textual app."""
