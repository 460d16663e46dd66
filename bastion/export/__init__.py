"""Exporters behind `bastion models export` (optional `export` extra)."""
