"""autoglm-export: turn a GLM-4.1V / AutoGLM-Phone-9B checkpoint into verified on-device bundles."""

__version__ = "0.1.0"
