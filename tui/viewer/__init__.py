"""The viewer's data model: indexes, sources, reports and value formatting for `trace view`. No textual; the app reads through it."""
