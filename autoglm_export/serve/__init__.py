"""An OpenAI-compatible chat service on an exported bundle (``autoglm-export serve``)."""
