"""The OpenAI-compatible HTTP surface: request/response shapes, chat + tool formatting, routes."""
