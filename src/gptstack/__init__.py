"""gptstack: a GPT-3-architecture language model from raw text to an OpenAI-compatible server."""

__version__ = "0.1.0"
