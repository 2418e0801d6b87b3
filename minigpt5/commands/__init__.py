"""The commands of the `minigpt5` CLI that do more than parse flags; cli.py dispatches to them."""
