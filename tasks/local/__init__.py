"""Tasks that act on the machine running the flow (an app repository checkout)."""
