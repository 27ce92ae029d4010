"""Imports every built-in command module so each registers itself on the `cli` group."""
