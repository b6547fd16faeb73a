"""Forge's `modules_forge` package: present, so the extension knows it runs in Forge."""
