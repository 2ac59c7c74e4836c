"""The Textual app of `trace view` and its widgets; the only package that imports textual."""
