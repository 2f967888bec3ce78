"""Runtimes: the only code that moves payloads and updates between the Strategy and the clients."""
