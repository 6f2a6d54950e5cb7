"""PyTorch backend of curvopt (public entry point: ``curvopt.torch``)."""
__all__: list[str] = []
