"""Renderers: pure functions of a DiffResult -> text (console, Markdown, HTML, summary JSON)."""
