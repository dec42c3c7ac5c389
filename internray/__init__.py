"""internray: the InternLM full chain (data, train, serve, eval, agents) as one framework on Ray."""

__version__ = "0.1.0"
